//! Spill files: sorted runs of encoded records that an operator wrote to
//! local disk because its reservation could not grow.
//!
//! A run is a sequence of blocks in the service's own block format
//! (`shuffle_protocol`): about 64 KiB of framed records each, lz4-compressed
//! when that shrinks them, with a CRC32C of header and payload, so a run is
//! read back one block at a time and every block is checked. Files live in
//! the engine's spill directory under a `engine-spill-` name and are deleted
//! when the last handle on the run is dropped: when the operator is done
//! with it (or a checkpoint that copies it is written), also if the task
//! fails.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    sync::Arc,
};

use bytes::Bytes;
use shuffle_protocol::{BLOCK_HEADER_LEN, Block, BlockHeader, BlockId, Codec, RecordIter, append_record, record_len};

use crate::EngineError;

/// Raw bytes of records per spill block: the service's block size, so a
/// reader of a run holds about 64 KiB (twice that while decompressing).
pub(crate) const SPILL_BLOCK_BYTES: usize = 64 << 10;

/// What one open run reader holds at most: a block stored and decompressed.
pub(crate) const RUN_READER_BYTES: usize = 2 * (SPILL_BLOCK_BYTES + BLOCK_HEADER_LEN);

fn corrupt(path: &Path, detail: impl std::fmt::Display) -> EngineError {
    EngineError::Spill { path: path.to_path_buf(), detail: detail.to_string() }
}

/// Cuts records into checked blocks of [`SPILL_BLOCK_BYTES`] and writes
/// them to `out`: a file (a run) or a buffer (a checkpoint section).
pub(crate) struct BlockEncoder<W> {
    out: W,
    /// For errors.
    name: PathBuf,
    /// Framed records of the block being filled.
    raw: Vec<u8>,
    count: u32,
    records: u64,
    written: u64,
    sequence: u32,
}

impl<W: Write> BlockEncoder<W> {
    pub(crate) fn new(out: W, name: PathBuf) -> Self {
        Self { out, name, raw: Vec::new(), count: 0, records: 0, written: 0, sequence: 0 }
    }

    /// Appends a record (runs are written in the order they will be read).
    pub(crate) fn push(&mut self, key: &[u8], value: &[u8]) -> Result<(), EngineError> {
        if self.count > 0 && self.raw.len() + record_len(key.len(), value.len()) > SPILL_BLOCK_BYTES {
            self.write_block()?;
        }
        append_record(&mut self.raw, key, value);
        self.count += 1;
        self.records += 1;
        Ok(())
    }

    fn write_block(&mut self) -> Result<(), EngineError> {
        let id = BlockId { map: 0, attempt: 0, partition: 0, run: 0, sequence: self.sequence };
        let block = shuffle_protocol::encode_block(id, &self.raw, self.count, Codec::Lz4);
        // Local writes of one block: brief, but off the runtime's task threads' duties.
        tokio::task::block_in_place(|| self.out.write_all(&block)).map_err(|e| EngineError::io(&self.name, e))?;
        self.written += block.len() as u64;
        self.sequence += 1;
        self.raw.clear();
        self.count = 0;
        Ok(())
    }

    /// Writes the last block; the output, the bytes written and the records.
    pub(crate) fn finish(mut self) -> Result<(W, u64, u64), EngineError> {
        if self.count > 0 {
            self.write_block()?;
        }
        Ok((self.out, self.written, self.records))
    }
}

/// Writes one run to a file of its own.
pub(crate) struct SpillWriter {
    encoder: BlockEncoder<std::fs::File>,
    path: tempfile::TempPath,
}

impl SpillWriter {
    /// A new run file in `dir`.
    pub(crate) fn create(dir: &Path) -> Result<Self, EngineError> {
        let (file, path) = tempfile::Builder::new()
            .prefix("engine-spill-")
            .tempfile_in(dir)
            .map_err(|e| EngineError::io(dir, e))?
            .into_parts();
        Ok(Self { encoder: BlockEncoder::new(file, path.to_path_buf()), path })
    }

    /// Appends a record.
    pub(crate) fn push(&mut self, key: &[u8], value: &[u8]) -> Result<(), EngineError> {
        self.encoder.push(key, value)
    }

    /// Ends the run.
    pub(crate) fn finish(self) -> Result<SpillRun, EngineError> {
        let (_, len, records) = self.encoder.finish()?;
        Ok(SpillRun { path: Arc::new(self.path), len, records })
    }
}

/// A finished run on disk; clones share the file, deleted with the last.
#[derive(Clone)]
pub(crate) struct SpillRun {
    path: Arc<tempfile::TempPath>,
    len: u64,
    records: u64,
}

impl SpillRun {
    /// Bytes of the file.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Records in the run.
    pub(crate) fn records(&self) -> u64 {
        self.records
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the run from its start.
    pub(crate) fn open(&self) -> Result<RunReader<std::fs::File>, EngineError> {
        let file = std::fs::File::open(&*self.path).map_err(|e| EngineError::io(&*self.path, e))?;
        // The reader keeps a handle on the run, so the file outlives every reader.
        Ok(RunReader::new(file, self.path.to_path_buf(), Some(self.clone())))
    }
}

/// Reads the records of a run (a file, or a section of a checkpoint) block by block.
pub(crate) struct RunReader<R> {
    source: R,
    /// For errors.
    name: PathBuf,
    /// Keeps the file of a spilled run while it is read.
    _run: Option<SpillRun>,
    current: Bytes,
    offset: usize,
    sequence: u32,
}

impl<R: Read> RunReader<R> {
    pub(crate) fn new(source: R, name: PathBuf, run: Option<SpillRun>) -> Self {
        Self { source, name, _run: run, current: Bytes::new(), offset: 0, sequence: 0 }
    }

    /// The next record, key and value sharing their block's buffer; `None` at the end.
    pub(crate) fn next_record(&mut self) -> Result<Option<(Bytes, Bytes)>, EngineError> {
        loop {
            if self.offset < self.current.len() {
                let mut records = RecordIter::new(&self.current[self.offset..]);
                let (key, value) = match records.next() {
                    Some(Ok(kv)) => kv,
                    Some(Err(e)) => return Err(corrupt(&self.name, e)),
                    None => return Err(corrupt(&self.name, "a block ends inside a record")),
                };
                let record = (self.current.slice_ref(key), self.current.slice_ref(value));
                self.offset = self.current.len() - records.remaining_bytes();
                return Ok(Some(record));
            }
            if !self.next_block()? {
                return Ok(None);
            }
        }
    }

    /// Reads the next block; `false` at the end of the run. A block's reads
    /// are short and mostly from the page cache; they run in place, letting
    /// the runtime hand the thread's other tasks to another thread.
    fn next_block(&mut self) -> Result<bool, EngineError> {
        tokio::task::block_in_place(|| self.read_block())
    }

    fn read_block(&mut self) -> Result<bool, EngineError> {
        let mut header = [0u8; BLOCK_HEADER_LEN];
        let mut filled = 0;
        while filled < header.len() {
            match self.source.read(&mut header[filled..]) {
                Ok(0) if filled == 0 => return Ok(false),
                Ok(0) => return Err(corrupt(&self.name, "the run ends inside a block header")),
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(EngineError::io(&self.name, e)),
            }
        }
        let parsed = BlockHeader::decode(&header).map_err(|e| corrupt(&self.name, e))?;
        if parsed.id.sequence != self.sequence {
            return Err(corrupt(
                &self.name,
                format!("block {} where {} was expected", parsed.id.sequence, self.sequence),
            ));
        }
        let mut bytes = Vec::with_capacity(BLOCK_HEADER_LEN + parsed.stored_len as usize);
        bytes.extend_from_slice(&header);
        bytes.resize(BLOCK_HEADER_LEN + parsed.stored_len as usize, 0);
        self.source.read_exact(&mut bytes[BLOCK_HEADER_LEN..]).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => corrupt(&self.name, "the run ends inside a block"),
            _ => EngineError::io(&self.name, e),
        })?;
        let block = Block::parse(Bytes::from(bytes)).map_err(|e| corrupt(&self.name, e))?;
        self.current = block.into_records().map_err(|e| corrupt(&self.name, e))?;
        self.offset = 0;
        self.sequence += 1;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_reads_back_exactly_and_its_file_goes_with_its_last_handle() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = SpillWriter::create(dir.path()).unwrap();
        let records: Vec<(Vec<u8>, Vec<u8>)> =
            (0..20_000u32).map(|i| (i.to_be_bytes().to_vec(), vec![(i % 251) as u8; (i % 40) as usize])).collect();
        for (k, v) in &records {
            writer.push(k, v).unwrap();
        }
        let run = writer.finish().unwrap();
        assert_eq!(run.records(), 20_000);
        let mut reader = run.open().unwrap();
        let path = run.path().to_path_buf();
        drop(run);
        let mut got = Vec::new();
        while let Some((k, v)) = reader.next_record().unwrap() {
            got.push((k.to_vec(), v.to_vec()));
        }
        assert_eq!(got, records);
        assert!(path.exists(), "a reader keeps the run's file");
        drop(reader);
        assert!(!path.exists(), "the file is deleted with its last handle");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_damaged_run_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = SpillWriter::create(dir.path()).unwrap();
        for i in 0..5_000u32 {
            writer.push(&i.to_be_bytes(), b"some value bytes").unwrap();
        }
        let run = writer.finish().unwrap();
        let mut bytes = std::fs::read(run.path()).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        let mut reader = RunReader::new(&bytes[..], run.path().to_path_buf(), None);
        let err = loop {
            match reader.next_record() {
                Ok(Some(_)) => {}
                Ok(None) => panic!("a flipped bit went unnoticed"),
                Err(e) => break e,
            }
        };
        assert!(err.to_string().contains(&run.path().display().to_string()), "{err}");
        let mut truncated = RunReader::new(&bytes[..100], run.path().to_path_buf(), None);
        assert!(truncated.next_record().is_err());
    }
}
