//! Running a job: [`Dataset::start`] spawns it on the engine's runtime and
//! returns a [`Job`] handle, whose metrics can be read while it runs and
//! which is waited for from synchronous code ([`Job::wait`]) or from async
//! code ([`Job::wait_async`], for an application with its own tokio
//! runtime). [`Dataset::run`] and [`Dataset::run_async`] do both at once
//! with a user's [`Sink`]; the built-in sinks (`collect`, `write_text`, …)
//! go through the same path.

use std::sync::Arc;

use crate::{
    Data, Dataset, EngineError, ExecutionMode, executor,
    metrics::{JobMetrics, JobStats},
    sink::{Sink, SinkFactory, user_sink},
};

/// What a finished job reports.
#[derive(Clone, Debug)]
pub struct JobReport {
    pub metrics: JobMetrics,
}

/// A job running on the engine's runtime.
pub struct Job {
    stats: Arc<JobStats>,
    handle: Option<tokio::task::JoinHandle<Result<(), EngineError>>>,
    runtime: tokio::runtime::Handle,
}

impl Job {
    /// The job's figures now: per stage and task, checkpoints, restarts.
    pub fn metrics(&self) -> JobMetrics {
        self.stats.snapshot()
    }

    /// Whether the job has ended (successfully or not).
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(tokio::task::JoinHandle::is_finished)
    }

    /// Waits for the job from synchronous code (not from inside a tokio
    /// runtime: use [`Job::wait_async`] there).
    pub fn wait(&mut self) -> Result<JobReport, EngineError> {
        refuse_in_async("Job::wait")?;
        let runtime = self.runtime.clone();
        runtime.block_on(self.wait_async())
    }

    /// Waits for the job from async code, on any runtime.
    pub async fn wait_async(&mut self) -> Result<JobReport, EngineError> {
        let handle = self.handle.take().ok_or_else(|| EngineError::Runtime("the job was already waited for".into()))?;
        let outcome = match handle.await {
            Ok(outcome) => outcome,
            Err(e) if e.is_panic() => Err(EngineError::Runtime(format!("the job panicked: {e}"))),
            Err(e) => Err(EngineError::Runtime(e.to_string())),
        };
        outcome.map(|()| JobReport { metrics: self.stats.snapshot() })
    }
}

/// The blocking calls fail, rather than hang or panic, from inside a tokio runtime.
fn refuse_in_async(call: &str) -> Result<(), EngineError> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(EngineError::Runtime(format!(
            "{call} blocks; from async code use Dataset::run_async, Job::wait_async or the _async sinks"
        )));
    }
    Ok(())
}

impl<T: Data> Dataset<T> {
    /// Starts the job in `mode` writing into `sink`, and returns at once.
    pub fn start<S: Sink<T>>(&self, mode: ExecutionMode, sink: S) -> Result<Job, EngineError> {
        self.start_factory(mode, user_sink(sink))
    }

    /// Runs the job in `mode` writing into `sink`, and waits for it (from synchronous code).
    pub fn run<S: Sink<T>>(&self, mode: ExecutionMode, sink: S) -> Result<JobReport, EngineError> {
        refuse_in_async("Dataset::run")?;
        self.start(mode, sink)?.wait()
    }

    /// Runs the job in `mode` writing into `sink`, from async code.
    pub async fn run_async<S: Sink<T>>(&self, mode: ExecutionMode, sink: S) -> Result<JobReport, EngineError> {
        self.start(mode, sink)?.wait_async().await
    }

    pub(crate) fn start_factory(&self, mode: ExecutionMode, sink: SinkFactory<T>) -> Result<Job, EngineError> {
        let stats = Arc::new(JobStats::for_dataset(self, mode));
        let (dataset, job_stats) = (self.clone(), stats.clone());
        let runtime = self.engine.inner.runtime().handle().clone();
        let handle = runtime.spawn(async move { executor::run(&dataset, mode, sink, job_stats).await });
        Ok(Job { stats, handle: Some(handle), runtime })
    }

    pub(crate) fn run_factory(&self, mode: ExecutionMode, sink: SinkFactory<T>) -> Result<JobReport, EngineError> {
        refuse_in_async("running a job")?;
        self.start_factory(mode, sink)?.wait()
    }
}
