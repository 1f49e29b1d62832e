//! Where streaming checkpoints go: the [`StateBackend`] trait, its local-file
//! implementation [`LocalStateBackend`], and the format of one task's state.
//!
//! A task's snapshot is a list of sections, one per stateful operator of the
//! task (its source's position, a reduction's table, a join's two sides, a
//! sink's pending output), each keyed by the operator's id. It is built in
//! the task when the checkpoint's barriers have all arrived (the
//! synchronous part: serializing in-memory state; spilled runs are
//! referenced, not copied) and streamed to the backend on a blocking thread
//! while the task goes on (the asynchronous part). Format:
//!
//! | bytes | what |
//! | --- | --- |
//! | 8 | magic `ENGSTAT1` |
//! | 4 | number of sections `n`, u32 little-endian |
//! | 16 × n | per section: operator id u64, length u64 |
//! | … | the sections' bytes, in table order |
//! | 4 | CRC32C of everything before it |
//!
//! A backend stores opaque bytes: task states under names it chooses (a
//! [`StateHandle`]) and, per job, the manifest of its latest complete
//! checkpoint, replaced atomically. Another backend (an object store, a
//! distributed file system) plugs in by implementing the six methods of
//! [`StateBackend`] and is given to the engine with
//! [`crate::EngineBuilder::state_backend`]: `write` puts an object, `read`
//! gets it, `complete` writes the manifest object last (it names only
//! objects already written, so a reader of the manifest never sees a
//! partial checkpoint), `discard` and `remove` delete.

use std::{
    collections::HashMap,
    io::{Read, Write},
    path::{Path, PathBuf},
    sync::Arc,
};

use bytes::{Buf, Bytes};
use serde::{Deserialize, Serialize};

use crate::{
    EngineError,
    spill::{RunReader, SpillRun},
};

/// First bytes of every task state.
const MAGIC: &[u8; 8] = b"ENGSTAT1";

/// Sections up to this size are read back into memory; larger ones (a
/// sorter's buffered input) into a file in the spill directory.
const MEMORY_SECTION_BYTES: u64 = 1 << 20;

/// Where a backend put one task's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateHandle(pub String);

/// Durable storage for checkpoints. Implementations must be safe to call
/// from several threads at once; the engine calls them from blocking
/// threads, never from its tasks' threads.
pub trait StateBackend: Send + Sync + 'static {
    /// Stores the state of `task` in checkpoint `checkpoint` of `job`,
    /// reading it to its end, durably (what `write` returned must survive a
    /// crash once `complete` names it).
    fn write(&self, job: &str, checkpoint: u64, task: &str, state: &mut dyn Read) -> std::io::Result<StateHandle>;
    /// Reads back a state `write` stored.
    fn read(&self, handle: &StateHandle) -> std::io::Result<Box<dyn Read + Send>>;
    /// Records `manifest` as `job`'s latest complete checkpoint, atomically.
    fn complete(&self, job: &str, checkpoint: u64, manifest: &[u8]) -> std::io::Result<()>;
    /// The manifest of `job`'s latest complete checkpoint, if any.
    fn latest(&self, job: &str) -> std::io::Result<Option<Vec<u8>>>;
    /// Deletes the task states of `checkpoint` of `job` (it is superseded).
    fn discard(&self, job: &str, checkpoint: u64) -> std::io::Result<()>;
    /// Deletes everything of `job` (it ended).
    fn remove(&self, job: &str) -> std::io::Result<()>;
}

/// Keeps checkpoints in a directory: `<dir>/<job>/chk-<n>/<task>.state`
/// and `<dir>/<job>/_manifest`. Each file is written to a temporary name,
/// synced and renamed, so a crash leaves either the old or the new one.
#[derive(Clone, Debug)]
pub struct LocalStateBackend {
    dir: PathBuf,
}

impl LocalStateBackend {
    /// A backend keeping its files under `dir` (created if missing).
    pub fn new(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn job_dir(&self, job: &str) -> std::io::Result<PathBuf> {
        if job.is_empty() || job.contains(['/', '\\']) || job.starts_with('.') {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("bad job name {job:?}")));
        }
        Ok(self.dir.join(job))
    }

    /// Writes `path` atomically from `data`.
    fn write_file(path: &Path, data: &mut dyn Read) -> std::io::Result<u64> {
        let temp = path.with_extension("tmp");
        let mut file = std::fs::File::create(&temp)?;
        let n = std::io::copy(data, &mut file)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        if let Some(parent) = path.parent() {
            std::fs::File::open(parent)?.sync_all()?;
        }
        Ok(n)
    }
}

impl StateBackend for LocalStateBackend {
    fn write(&self, job: &str, checkpoint: u64, task: &str, state: &mut dyn Read) -> std::io::Result<StateHandle> {
        let dir = self.job_dir(job)?.join(format!("chk-{checkpoint}"));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{task}.state"));
        Self::write_file(&path, state)?;
        Ok(StateHandle(path.to_string_lossy().into_owned()))
    }

    fn read(&self, handle: &StateHandle) -> std::io::Result<Box<dyn Read + Send>> {
        let path = Path::new(&handle.0);
        if !path.starts_with(&self.dir) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is not in {}", handle.0, self.dir.display()),
            ));
        }
        Ok(Box::new(std::io::BufReader::with_capacity(256 << 10, std::fs::File::open(path)?)))
    }

    fn complete(&self, job: &str, _checkpoint: u64, manifest: &[u8]) -> std::io::Result<()> {
        let dir = self.job_dir(job)?;
        std::fs::create_dir_all(&dir)?;
        Self::write_file(&dir.join("_manifest"), &mut &manifest[..]).map(|_| ())
    }

    fn latest(&self, job: &str) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.job_dir(job)?.join("_manifest")) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn discard(&self, job: &str, checkpoint: u64) -> std::io::Result<()> {
        match std::fs::remove_dir_all(self.job_dir(job)?.join(format!("chk-{checkpoint}"))) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn remove(&self, job: &str) -> std::io::Result<()> {
        match std::fs::remove_dir_all(self.job_dir(job)?) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// What one task had at a complete checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum TaskCheckpoint {
    /// Its snapshot.
    Snapshot { handle: StateHandle, bytes: u64 },
    /// It had finished: its input ended and all its output was written.
    Finished,
}

/// A complete checkpoint: every task's state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct CheckpointManifest {
    pub checkpoint: u64,
    pub tasks: HashMap<String, TaskCheckpoint>,
}

impl CheckpointManifest {
    pub(crate) fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("manifests always serialize")
    }

    /// Reads a manifest back (a restarter resuming a job from [`StateBackend::latest`]).
    #[cfg(test)]
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, EngineError> {
        postcard::from_bytes(bytes).map_err(|e| EngineError::State(format!("a checkpoint manifest: {e}")))
    }
}

/// One piece of a section.
enum Part {
    Bytes(Bytes),
    Run(SpillRun),
}

impl Part {
    fn len(&self) -> u64 {
        match self {
            Self::Bytes(b) => b.len() as u64,
            Self::Run(run) => run.len(),
        }
    }
}

/// One operator's section of a snapshot.
#[derive(Default)]
pub(crate) struct SectionWriter {
    parts: Vec<Part>,
}

impl SectionWriter {
    /// Appends bytes as they are.
    pub(crate) fn bytes(&mut self, bytes: Vec<u8>) {
        self.parts.push(Part::Bytes(Bytes::from(bytes)));
    }

    /// Appends a chunk of checked blocks ([`crate::spill::BlockEncoder`]'s output), length first.
    pub(crate) fn chunk(&mut self, blocks: Vec<u8>) {
        self.bytes((blocks.len() as u64).to_le_bytes().to_vec());
        self.bytes(blocks);
    }

    /// Appends a spilled run's file as a chunk, without copying it now.
    pub(crate) fn run(&mut self, run: SpillRun) {
        self.bytes(run.len().to_le_bytes().to_vec());
        self.parts.push(Part::Run(run));
    }

    fn len(&self) -> u64 {
        self.parts.iter().map(Part::len).sum()
    }
}

/// A task's state at a checkpoint, before it is written.
#[derive(Default)]
pub(crate) struct Snapshot {
    sections: Vec<(u64, SectionWriter)>,
}

impl Snapshot {
    /// A new section for operator `op`.
    pub(crate) fn section(&mut self, op: u64) -> &mut SectionWriter {
        self.sections.push((op, SectionWriter::default()));
        &mut self.sections.last_mut().expect("pushed above").1
    }

    /// A section of serialized state for operator `op`.
    pub(crate) fn put(&mut self, op: u64, state: &impl Serialize) -> Result<(), EngineError> {
        let bytes = postcard::to_stdvec(state).map_err(|e| EngineError::State(format!("operator {op}: {e}")))?;
        self.section(op).bytes(bytes);
        Ok(())
    }

    /// Bytes the written state will take.
    pub(crate) fn size(&self) -> u64 {
        12 + 16 * self.sections.len() as u64 + self.sections.iter().map(|(_, s)| s.len()).sum::<u64>() + 4
    }

    /// The state's bytes as a stream, in the format above.
    pub(crate) fn into_reader(self) -> SnapshotReader {
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&(self.sections.len() as u32).to_le_bytes());
        for (op, section) in &self.sections {
            header.extend_from_slice(&op.to_le_bytes());
            header.extend_from_slice(&section.len().to_le_bytes());
        }
        let mut parts = vec![Part::Bytes(Bytes::from(header))];
        parts.extend(self.sections.into_iter().flat_map(|(_, s)| s.parts));
        SnapshotReader { parts: parts.into_iter(), current: None, crc: 0, trailer: None }
    }
}

/// Streams a snapshot: its parts, then the CRC of all of them.
pub(crate) struct SnapshotReader {
    parts: std::vec::IntoIter<Part>,
    current: Option<Box<dyn Read + Send>>,
    crc: u32,
    trailer: Option<bytes::buf::Reader<Bytes>>,
}

impl Read for SnapshotReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if let Some(trailer) = &mut self.trailer {
                return trailer.read(buf);
            }
            if let Some(current) = &mut self.current {
                let n = current.read(buf)?;
                if n > 0 {
                    self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
                    return Ok(n);
                }
                self.current = None;
            }
            match self.parts.next() {
                Some(Part::Bytes(bytes)) => self.current = Some(Box::new(bytes.reader())),
                Some(Part::Run(run)) => {
                    let file = std::fs::File::open(run.path())?;
                    // The run stays on disk while it is read: the reader holds it.
                    self.current = Some(Box::new(RunFile { file, _run: run }));
                }
                None => self.trailer = Some(Bytes::copy_from_slice(&self.crc.to_le_bytes()).reader()),
            }
        }
    }
}

/// A spilled run's file, kept alive while a snapshot copies it.
struct RunFile {
    file: std::fs::File,
    _run: SpillRun,
}

impl Read for RunFile {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }
}

/// One operator's restored section.
enum SectionData {
    Memory(Bytes),
    File(tempfile::TempPath),
}

/// A task's state, read back from a checkpoint.
#[derive(Default)]
pub(crate) struct RestoredState {
    sections: HashMap<u64, SectionData>,
}

impl RestoredState {
    /// Reads and checks a state `Snapshot::into_reader` wrote; large
    /// sections go to files in `spill_dir`.
    pub(crate) fn load(mut source: impl Read, spill_dir: &Path, name: &str) -> Result<Self, EngineError> {
        let bad = |detail: String| EngineError::State(format!("the state of {name}: {detail}"));
        let mut crc = 0u32;
        let mut read_exact = |source: &mut dyn Read, buf: &mut [u8]| -> Result<(), EngineError> {
            source.read_exact(buf).map_err(|e| bad(format!("reading: {e}")))?;
            crc = crc32c::crc32c_append(crc, buf);
            Ok(())
        };
        let mut head = [0u8; 12];
        read_exact(&mut source, &mut head)?;
        if &head[..8] != MAGIC {
            return Err(bad("not a task state (bad magic)".into()));
        }
        let count = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
        if count > 1 << 20 {
            return Err(bad(format!("{count} sections")));
        }
        let mut table = vec![0u8; 16 * count as usize];
        read_exact(&mut source, &mut table)?;
        let mut sections = HashMap::new();
        for entry in table.chunks_exact(16) {
            let op = u64::from_le_bytes(entry[..8].try_into().expect("8 bytes"));
            let len = u64::from_le_bytes(entry[8..].try_into().expect("8 bytes"));
            let data = if len <= MEMORY_SECTION_BYTES {
                let mut bytes = vec![0u8; len as usize];
                read_exact(&mut source, &mut bytes)?;
                SectionData::Memory(Bytes::from(bytes))
            } else {
                let (mut file, path) = tempfile::Builder::new()
                    .prefix("engine-restore-")
                    .tempfile_in(spill_dir)
                    .map_err(|e| EngineError::io(spill_dir, e))?
                    .into_parts();
                let mut left = len;
                let mut buf = vec![0u8; 256 << 10];
                while left > 0 {
                    let n = left.min(buf.len() as u64) as usize;
                    read_exact(&mut source, &mut buf[..n])?;
                    file.write_all(&buf[..n]).map_err(|e| EngineError::io(&*path, e))?;
                    left -= n as u64;
                }
                SectionData::File(path)
            };
            if sections.insert(op, data).is_some() {
                return Err(bad(format!("operator {op} has two sections")));
            }
        }
        let mut trailer = [0u8; 4];
        source.read_exact(&mut trailer).map_err(|e| bad(format!("reading its checksum: {e}")))?;
        if u32::from_le_bytes(trailer) != crc {
            return Err(bad("checksum mismatch".into()));
        }
        Ok(Self { sections })
    }

    /// Operator `op`'s section, if the task had one for it.
    pub(crate) fn section(&self, op: u64) -> Result<Option<SectionReader>, EngineError> {
        let Some(data) = self.sections.get(&op) else { return Ok(None) };
        let source: Box<dyn Read + Send> = match data {
            SectionData::Memory(bytes) => Box::new(bytes.clone().reader()),
            SectionData::File(path) => Box::new(std::io::BufReader::new(
                std::fs::File::open(&**path).map_err(|e| EngineError::io(&**path, e))?,
            )),
        };
        Ok(Some(SectionReader { source, name: format!("the checkpointed state of operator {op}") }))
    }

    /// Operator `op`'s section as bytes, if any.
    pub(crate) fn bytes(&self, op: u64) -> Result<Option<Vec<u8>>, EngineError> {
        let Some(mut section) = self.section(op)? else { return Ok(None) };
        let mut bytes = Vec::new();
        section.source.read_to_end(&mut bytes).map_err(|e| EngineError::State(format!("{}: {e}", section.name)))?;
        Ok(Some(bytes))
    }

    /// Operator `op`'s serialized state, if any.
    pub(crate) fn get<T: serde::de::DeserializeOwned>(&self, op: u64) -> Result<Option<T>, EngineError> {
        let Some(bytes) = self.bytes(op)? else { return Ok(None) };
        postcard::from_bytes(&bytes)
            .map(Some)
            .map_err(|e| EngineError::State(format!("the checkpointed state of operator {op}: {e}")))
    }
}

/// Reads one operator's section.
pub(crate) struct SectionReader {
    source: Box<dyn Read + Send>,
    name: String,
}

impl SectionReader {
    /// The next chunk [`SectionWriter::chunk`] or [`SectionWriter::run`]
    /// wrote, as a run of records; read it to its end before the next.
    pub(crate) fn next_chunk(
        &mut self,
    ) -> Result<Option<RunReader<std::io::Take<&mut (dyn Read + Send)>>>, EngineError> {
        let mut len = [0u8; 8];
        match self.source.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(EngineError::State(format!("{}: {e}", self.name))),
        }
        let take = (&mut *self.source as &mut (dyn Read + Send)).take(u64::from_le_bytes(len));
        Ok(Some(RunReader::new(take, PathBuf::from(&self.name), None)))
    }
}

/// A backend shared by the engine's jobs.
pub(crate) type SharedBackend = Arc<dyn StateBackend>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spill::{BlockEncoder, SpillWriter};

    #[test]
    fn a_snapshot_reads_back_section_by_section_and_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut snapshot = Snapshot::default();
        snapshot.put(7, &(42u64, "position".to_string())).unwrap();
        let section = snapshot.section(9);
        let mut encoder = BlockEncoder::new(Vec::new(), "test".into());
        for i in 0..10u32 {
            encoder.push(&i.to_be_bytes(), b"in memory").unwrap();
        }
        section.chunk(encoder.finish().unwrap().0);
        let mut writer = SpillWriter::create(dir.path()).unwrap();
        for i in 0..200_000u32 {
            writer.push(&i.to_be_bytes(), b"spilled run").unwrap();
        }
        section.run(writer.finish().unwrap());
        let size = snapshot.size();
        let mut bytes = Vec::new();
        snapshot.into_reader().read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes.len() as u64, size);

        let state = RestoredState::load(&bytes[..], dir.path(), "task").unwrap();
        assert_eq!(state.get::<(u64, String)>(7).unwrap(), Some((42, "position".to_string())));
        let mut section = state.section(9).unwrap().unwrap();
        let mut counts = Vec::new();
        while let Some(mut chunk) = section.next_chunk().unwrap() {
            let mut n = 0;
            while chunk.next_record().unwrap().is_some() {
                n += 1;
            }
            counts.push(n);
        }
        assert_eq!(counts, [10, 200_000]);
        assert!(state.section(8).unwrap().is_none());

        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        let err = RestoredState::load(&bytes[..], dir.path(), "task 3").err().unwrap();
        assert!(err.to_string().contains("task 3"), "{err}");
    }

    #[test]
    fn the_local_backend_replaces_its_manifest_atomically_and_removes_what_it_is_told() {
        let dir = tempfile::tempdir().unwrap();
        let backend = LocalStateBackend::new(dir.path()).unwrap();
        assert_eq!(backend.latest("job-1").unwrap(), None);
        let handle = backend.write("job-1", 1, "s2.m0", &mut &b"state"[..]).unwrap();
        backend.complete("job-1", 1, b"manifest 1").unwrap();
        backend.complete("job-1", 2, b"manifest 2").unwrap();
        assert_eq!(backend.latest("job-1").unwrap().as_deref(), Some(&b"manifest 2"[..]));
        let mut back = Vec::new();
        backend.read(&handle).unwrap().read_to_end(&mut back).unwrap();
        assert_eq!(back, b"state");
        let manifest = CheckpointManifest {
            checkpoint: 2,
            tasks: HashMap::from([("r-0".to_string(), TaskCheckpoint::Snapshot { handle: handle.clone(), bytes: 5 })]),
        };
        backend.complete("job-1", 2, &manifest.encode()).unwrap();
        let back = CheckpointManifest::decode(&backend.latest("job-1").unwrap().unwrap()).unwrap();
        assert_eq!((back.checkpoint, back.tasks.len()), (2, 1));
        backend.discard("job-1", 1).unwrap();
        assert!(backend.read(&handle).is_err());
        assert!(backend.read(&StateHandle("/etc/passwd".into())).is_err(), "handles outside its dir are refused");
        assert!(backend.write("../x", 1, "t", &mut &b""[..]).is_err());
        backend.remove("job-1").unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
