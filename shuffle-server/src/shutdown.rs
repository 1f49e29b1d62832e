//! Shutdown flows from one signal: a [`Shutdown`] that every task can wait on,
//! and an [`InFlight`] count of requests the server must let finish.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use tokio::sync::{Notify, watch};

/// The server-wide stop signal.
#[derive(Clone)]
pub struct Shutdown {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self { tx: Arc::new(watch::Sender::new(false)) }
    }
}

impl Shutdown {
    /// Signals every waiter; idempotent.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// Whether the signal was given.
    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }

    /// Completes once the signal is given.
    pub async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

/// Counts requests in flight, so shutdown can wait for them.
#[derive(Clone, Default)]
pub struct InFlight {
    inner: Arc<(AtomicUsize, Notify)>,
}

/// One request in flight; dropping it ends it.
pub struct InFlightGuard {
    inner: Arc<(AtomicUsize, Notify)>,
}

impl InFlight {
    /// Marks one more request in flight.
    pub fn enter(&self) -> InFlightGuard {
        self.inner.0.fetch_add(1, Ordering::AcqRel);
        InFlightGuard { inner: self.inner.clone() }
    }

    /// Requests in flight now.
    pub fn count(&self) -> usize {
        self.inner.0.load(Ordering::Acquire)
    }

    /// Completes when no request is in flight.
    pub async fn drained(&self) {
        loop {
            let notified = self.inner.1.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.inner.0.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.1.notify_waiters();
        }
    }
}
