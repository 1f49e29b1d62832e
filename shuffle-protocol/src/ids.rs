//! Identifiers of the things being shuffled: app → shuffle → map attempt → partition.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ProtocolError;

/// Index of a map task within its shuffle, `0..maps`.
pub type MapId = u32;
/// Attempt number of a map task; a retried task writes under a new attempt.
pub type AttemptId = u32;
/// Index of a partition within its shuffle, `0..partitions`.
pub type PartitionId = u32;

/// Longest app id accepted; ids become directory names on the server, so they
/// are kept short and free of path separators.
pub const MAX_APP_ID_LEN: usize = 64;

/// The application (job) that owns shuffles. Chosen by the client, it becomes a
/// directory name on the server, hence the restricted alphabet.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AppId(String);

impl AppId {
    /// Validates `id`: 1 to [`MAX_APP_ID_LEN`] characters of `[A-Za-z0-9._-]`,
    /// and not made of dots alone (which would name a parent directory).
    pub fn new(id: impl Into<String>) -> Result<Self, ProtocolError> {
        let id = id.into();
        let valid_chars = id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
        if id.is_empty() || id.len() > MAX_APP_ID_LEN || !valid_chars || id.bytes().all(|b| b == b'.') {
            return Err(ProtocolError::MalformedMessage {
                what: "app id",
                reason: format!(
                    "{id:?} is not 1 to {MAX_APP_ID_LEN} characters of [A-Za-z0-9._-] (and not dots alone)"
                ),
            });
        }
        Ok(Self(id))
    }

    /// Re-checks an id that arrived over the network (serde bypasses [`AppId::new`]).
    pub fn validate(&self) -> Result<(), ProtocolError> {
        Self::new(self.0.clone()).map(|_| ())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AppId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One exchange edge of an app's job graph, chosen by the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ShuffleId(pub u32);

impl fmt::Display for ShuffleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_ids_that_could_escape_the_data_dir_are_rejected() {
        for bad in ["", ".", "..", "a/b", "a\\b", "x y", &"a".repeat(65)] {
            assert!(AppId::new(bad).is_err(), "{bad:?} should be rejected");
        }
        for good in ["app-1", "spark_app.20261122", "A", &"a".repeat(64)] {
            assert!(AppId::new(good).is_ok(), "{good:?} should be accepted");
        }
    }
}
