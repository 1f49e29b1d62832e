//! What a graceful shutdown leaves on disk so that the next start serves
//! the committed shuffles of apps that still exist.
//!
//! At shutdown every shuffle's blocks are spilled, its files synced, and a
//! manifest written durably beside them: the spec, every committed map with
//! its declared totals, and where each committed block lies. Each app gets
//! one too, with its secret, so its clients can reconnect. At start the
//! server loads the manifests and deletes them: from then on the live state
//! is in memory again, and a crash (SIGKILL) leaves no manifest behind, so
//! the next start removes that shuffle instead of serving stale state.

use std::path::Path;

use serde::{Deserialize, Serialize};
use shuffle_protocol::{ErrorKind, PartitionTotals, ServiceError, ShuffleSpec};

use super::files::write_durably;

/// Version of the manifest format.
pub const MANIFEST_FORMAT: u32 = 1;
/// File name of a shuffle's manifest, in its directory.
pub const SHUFFLE_MANIFEST: &str = "shuffle.manifest";
/// File name of an app's manifest, in its directory.
pub const APP_MANIFEST: &str = "app.manifest";

/// One data file of a shuffle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Name within the shuffle's directory.
    pub name: String,
    /// Bytes written (synced) when the manifest was made.
    pub len: u64,
}

/// One committed block on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRecord {
    pub map: u32,
    pub attempt: u32,
    pub partition: u32,
    pub run: u32,
    /// Index into [`BlocksManifest::files`].
    pub file: u32,
    pub offset: u64,
    pub len: u32,
}

/// Where a shuffle's committed blocks lie, in the order its storage keeps them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlocksManifest {
    pub files: Vec<FileRecord>,
    pub blocks: Vec<BlockRecord>,
}

/// A committed map and what it declared.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRecord {
    pub map: u32,
    pub attempt: u32,
    pub totals: Vec<PartitionTotals>,
}

/// Everything needed to serve a shuffle again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShuffleManifest {
    pub format: u32,
    pub shuffle: u32,
    pub spec: ShuffleSpec,
    pub commits: Vec<CommitRecord>,
    pub blocks: BlocksManifest,
    /// On a worker: attempts verified at their `MapEnd` whose decision had
    /// not arrived yet; their blocks are in `blocks` too.
    #[serde(default)]
    pub prepared: Vec<CommitRecord>,
}

/// An app and its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppManifest {
    pub format: u32,
    pub app: String,
    pub secret: String,
}

/// Writes `manifest` durably as `dir/name`. Blocking I/O.
pub fn write<T: Serialize>(dir: &Path, name: &str, manifest: &T) -> Result<(), ServiceError> {
    let bytes = postcard::to_stdvec(manifest)
        .map_err(|e| ServiceError::new(ErrorKind::Io, format!("encoding {}: {e}", dir.join(name).display())))?;
    write_durably(&dir.join(name), &bytes)
}

/// Reads `dir/name` and deletes it; `None` if there is none. Blocking I/O.
pub fn take<T: for<'de> Deserialize<'de>>(dir: &Path, name: &str) -> Result<Option<T>, ServiceError> {
    let path = dir.join(name);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(crate::disk::io_error(&path, "reading", e)),
    };
    let _ = std::fs::remove_file(&path);
    postcard::from_bytes(&bytes)
        .map(Some)
        .map_err(|e| ServiceError::new(ErrorKind::Io, format!("{} is not a manifest: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_is_read_once_then_gone() {
        let dir = tempfile::tempdir().unwrap();
        let m = AppManifest { format: MANIFEST_FORMAT, app: "a".into(), secret: "s".into() };
        write(dir.path(), APP_MANIFEST, &m).unwrap();
        assert_eq!(take::<AppManifest>(dir.path(), APP_MANIFEST).unwrap(), Some(m));
        assert_eq!(take::<AppManifest>(dir.path(), APP_MANIFEST).unwrap(), None);
    }

    #[test]
    fn a_corrupt_manifest_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(APP_MANIFEST), [0xff; 3]).unwrap();
        let err = take::<AppManifest>(dir.path(), APP_MANIFEST).unwrap_err();
        assert!(err.message.contains(APP_MANIFEST), "{}", err.message);
    }
}
