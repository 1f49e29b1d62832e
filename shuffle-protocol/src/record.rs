//! Record framing inside a block: each record is a LEB128 varint key length,
//! the key, a varint value length, the value. Records never span blocks.

use crate::ProtocolError;

/// Appends one framed record to `out`.
pub fn append_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    put_varint(out, key.len() as u64);
    out.extend_from_slice(key);
    put_varint(out, value.len() as u64);
    out.extend_from_slice(value);
}

/// Bytes that [`append_record`] adds for this key and value.
pub fn record_len(key_len: usize, value_len: usize) -> usize {
    varint_len(key_len as u64) + key_len + varint_len(value_len as u64) + value_len
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Asks the CPU to start loading the cache lines that hold the first and
/// the last of `bytes` (a record is rarely longer than two lines), so that
/// reading them later does not wait for memory. Only a hint: it reads
/// nothing into the program, cannot fault, and does nothing on targets other
/// than x86-64. For readers that jump between places far apart in memory
/// (a sorted run gathered from an arena, the heads of many merged runs),
/// which the CPU's own prefetchers cannot predict.
#[inline]
pub fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    if let (Some(first), Some(last)) = (bytes.first(), bytes.last()) {
        for p in [first as *const u8, last as *const u8] {
            // SAFETY: a prefetch instruction reads no memory into the
            // program and never faults, whatever the address; these point
            // into a live slice anyway.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// The first 8 bytes of `key` as a big-endian number, zero-padded: ordering
/// keys by this prefix first and by their bytes only on a tie gives exactly
/// bytewise order, while most comparisons stay a single integer compare.
pub fn key_prefix(key: &[u8]) -> u64 {
    let mut first = [0u8; 8];
    let n = key.len().min(8);
    first[..n].copy_from_slice(&key[..n]);
    u64::from_be_bytes(first)
}

/// Iterates the `(key, value)` records of a block's raw (decompressed) bytes.
///
/// Yields an error, once, if the bytes are cut short or a length is absurd;
/// the caller also compares the number of records with the block header's
/// record count via [`RecordIter::remaining_bytes`] at the end.
pub struct RecordIter<'a> {
    /// Bytes not yet consumed.
    rest: &'a [u8],
    /// Set after an error so iteration stops instead of repeating it.
    failed: bool,
}

impl<'a> RecordIter<'a> {
    /// Iterates the records framed in `raw`.
    pub fn new(raw: &'a [u8]) -> Self {
        Self { rest: raw, failed: false }
    }

    /// Bytes left unread; zero once every record has been yielded.
    pub fn remaining_bytes(&self) -> usize {
        self.rest.len()
    }

    fn varint(&mut self) -> Result<usize, ProtocolError> {
        let mut value: u64 = 0;
        for (i, &byte) in self.rest.iter().enumerate().take(10) {
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                self.rest = &self.rest[i + 1..];
                return usize::try_from(value)
                    .map_err(|_| ProtocolError::MalformedRecords(format!("length {value} overflows")));
            }
        }
        Err(ProtocolError::MalformedRecords("record length varint is cut short or too long".into()))
    }

    fn field(&mut self, what: &str) -> Result<&'a [u8], ProtocolError> {
        let len = self.varint()?;
        if len > self.rest.len() {
            return Err(ProtocolError::MalformedRecords(format!(
                "{what} of {len} bytes but only {} bytes remain",
                self.rest.len()
            )));
        }
        let (field, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(field)
    }
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = Result<(&'a [u8], &'a [u8]), ProtocolError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() || self.failed {
            return None;
        }
        let record = self.field("key").and_then(|k| Ok((k, self.field("value")?)));
        self.failed = record.is_err();
        Some(record)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn records_round_trip(records in proptest::collection::vec(
            (proptest::collection::vec(any::<u8>(), 0..200), proptest::collection::vec(any::<u8>(), 0..300)), 0..50)
        ) {
            let mut raw = Vec::new();
            for (k, v) in &records {
                let before = raw.len();
                append_record(&mut raw, k, v);
                prop_assert_eq!(raw.len() - before, record_len(k.len(), v.len()));
            }
            let decoded: Vec<(Vec<u8>, Vec<u8>)> = RecordIter::new(&raw)
                .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())))
                .collect::<Result<_, _>>()
                .unwrap();
            prop_assert_eq!(decoded, records);
        }

        #[test]
        fn truncated_records_are_an_error_not_a_panic(
            key in proptest::collection::vec(any::<u8>(), 1..200), cut in 1usize..100
        ) {
            let mut raw = Vec::new();
            append_record(&mut raw, &key, b"value");
            let cut = cut.min(raw.len() - 1);
            let results: Vec<_> = RecordIter::new(&raw[..raw.len() - cut]).collect();
            prop_assert!(results.last().unwrap().is_err());
        }
    }

    proptest! {
        #[test]
        fn prefix_then_bytes_is_bytewise_order(
            a in proptest::collection::vec(0u8..3, 0..12), b in proptest::collection::vec(0u8..3, 0..12)
        ) {
            let by_prefix = key_prefix(&a).cmp(&key_prefix(&b)).then_with(|| a.cmp(&b));
            prop_assert_eq!(by_prefix, a.cmp(&b));
        }
    }

    #[test]
    fn varint_len_matches_encoding() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u32::MAX as u64, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "value {v}");
        }
    }
}
