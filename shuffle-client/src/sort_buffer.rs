//! [`SortBuffer`]: the bounded buffer of a sort-mode writer. Records are
//! appended to one arena with a fixed-size entry each; when the buffer is
//! full it is sorted by partition (and by key, bytewise, when the shuffle
//! asks for key ordering) and becomes one run. Nothing is allocated per
//! partition, so R can be in the thousands.

use shuffle_protocol::{PartitionId, key_prefix, prefetch};

/// How many records ahead of the one being copied [`SortBuffer::prefetch`] is asked for.
pub const PREFETCH_AHEAD: usize = 16;

/// Bytes a sort buffer accounts per record besides its key and value.
pub const SORT_ENTRY_BYTES: usize = std::mem::size_of::<SortEntry>();

/// One record in the sort buffer: where its key and value lie in the arena.
#[derive(Clone, Copy, Debug)]
struct SortEntry {
    /// The key's first 8 bytes (see `key_prefix`), so most key comparisons need not touch the arena.
    prefix: u64,
    partition: PartitionId,
    offset: u32,
    key_len: u32,
    value_len: u32,
}

/// Keys and values back to back in an arena, one entry per record.
#[derive(Debug)]
pub struct SortBuffer {
    arena: Vec<u8>,
    entries: Vec<SortEntry>,
    /// Most bytes (arena + entries) before the buffer counts as full.
    capacity: usize,
    /// Whether records are sorted by key within each partition.
    key_ordering: bool,
}

impl SortBuffer {
    /// A buffer of at most `capacity` bytes (clamped so arena offsets fit a u32).
    pub fn new(capacity: usize, key_ordering: bool) -> Self {
        Self {
            arena: Vec::new(),
            entries: Vec::new(),
            capacity: capacity.clamp(4 * 1024, u32::MAX as usize / 2),
            key_ordering,
        }
    }

    /// Bytes held: keys, values and entries.
    pub fn used(&self) -> usize {
        self.arena.len() + self.entries.len() * SORT_ENTRY_BYTES
    }

    /// Number of records held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether a record of these sizes fits (an empty buffer takes any record).
    pub fn fits(&self, key_len: usize, value_len: usize) -> bool {
        self.entries.is_empty() || self.used() + key_len + value_len + SORT_ENTRY_BYTES <= self.capacity
    }

    /// Appends a record; check [`SortBuffer::fits`] first.
    pub fn push(&mut self, partition: PartitionId, key: &[u8], value: &[u8]) {
        let offset = self.arena.len() as u32;
        self.arena.extend_from_slice(key);
        self.arena.extend_from_slice(value);
        self.entries.push(SortEntry {
            prefix: if self.key_ordering { key_prefix(key) } else { 0 },
            partition,
            offset,
            key_len: key.len() as u32,
            value_len: value.len() as u32,
        });
    }

    /// Sorts the records by partition, and by key within a partition when
    /// the buffer orders keys. Records that tie keep the order they were
    /// pushed in (the arena offset breaks ties), so a run's order, and the
    /// key-ordered read's order of equal keys, follow what was written.
    pub fn sort(&mut self) {
        if !self.key_ordering {
            self.entries.sort_unstable_by_key(|e| (e.partition, e.offset));
            return;
        }
        // Most keys differ within their first 8 bytes: one pass orders the
        // entries by partition, key prefix and arena offset packed into one
        // integer, which compares without touching the arena; then each group
        // of entries that share a partition and a prefix (longer keys with a
        // common start, or equal keys) is put in full-key order.
        self.entries.sort_unstable_by_key(|e| {
            (u128::from(e.partition) << 96) | (u128::from(e.prefix) << 32) | u128::from(e.offset)
        });
        let arena = &self.arena;
        let key = |e: &SortEntry| &arena[e.offset as usize..(e.offset + e.key_len) as usize];
        for group in self.entries.chunk_by_mut(|a, b| (a.partition, a.prefix) == (b.partition, b.prefix)) {
            if group.len() > 1 {
                group.sort_unstable_by(|a, b| key(a).cmp(key(b)).then(a.offset.cmp(&b.offset)));
            }
        }
    }

    /// Record `i` (in sorted order after [`SortBuffer::sort`]): partition, key, value.
    pub fn record(&self, i: usize) -> (PartitionId, &[u8], &[u8]) {
        let e = &self.entries[i];
        let start = e.offset as usize;
        let (k, v) = self.arena[start..start + (e.key_len + e.value_len) as usize].split_at(e.key_len as usize);
        (e.partition, k, v)
    }

    /// Asks the CPU to start loading record `i`'s bytes (in sorted order),
    /// if there is such a record. Reading the records in sorted order jumps
    /// around an arena far larger than the caches, and every jump would
    /// otherwise wait for memory; a caller copying record `j` prefetches
    /// record `j + PREFETCH_AHEAD`. Only a hint (see [`prefetch`]).
    pub fn prefetch(&self, i: usize) {
        if let Some(e) = self.entries.get(i) {
            let start = e.offset as usize;
            prefetch(&self.arena[start..start + (e.key_len + e.value_len) as usize]);
        }
    }

    /// Empties the buffer, keeping its allocations.
    pub fn clear(&mut self) {
        self.arena.clear();
        self.entries.clear();
    }

    /// An empty buffer with the same capacity and ordering, and no allocations.
    pub(crate) fn empty_like(&self) -> Self {
        Self { arena: Vec::new(), entries: Vec::new(), capacity: self.capacity, key_ordering: self.key_ordering }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_by_partition_then_key_when_asked() {
        let mut b = SortBuffer::new(1 << 20, true);
        for (p, k) in [(2, "b"), (1, "zz"), (2, "a"), (1, "aaaaaaaaab"), (1, "aaaaaaaaaa")] {
            assert!(b.fits(k.len(), 1));
            b.push(p, k.as_bytes(), b"v");
        }
        b.sort();
        let got: Vec<(u32, &[u8])> = (0..b.len()).map(|i| (b.record(i).0, b.record(i).1)).collect();
        let want: Vec<(u32, &[u8])> = vec![(1, b"aaaaaaaaaa"), (1, b"aaaaaaaaab"), (1, b"zz"), (2, b"a"), (2, b"b")];
        assert_eq!(got, want);
    }

    #[test]
    fn equal_keys_keep_the_order_they_were_pushed_in() {
        for key_ordering in [true, false] {
            let mut b = SortBuffer::new(1 << 20, key_ordering);
            for i in 0..500u32 {
                b.push(i % 3, &[(i % 5) as u8], &i.to_be_bytes());
            }
            b.sort();
            let got: Vec<(u32, &[u8], &[u8])> = (0..b.len()).map(|i| b.record(i)).collect();
            for w in got.windows(2) {
                let same = if key_ordering { (w[0].0, w[0].1) == (w[1].0, w[1].1) } else { w[0].0 == w[1].0 };
                if same {
                    assert!(w[0].2 < w[1].2, "records that tie came out of the order they were pushed in");
                }
            }
        }
    }

    #[test]
    fn key_order_equals_a_stable_sort_by_partition_and_whole_key() {
        // Keys from a two-letter alphabet and 0 to 12 bytes long share long
        // prefixes (and many are equal), so most entries tie on their 8-byte
        // prefix and the full-key pass decides their order.
        let seed = 0x5eed_0f50_u64;
        println!("seed {seed:#x}");
        let mut state = seed;
        let mut next = move || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        for case in 0..200 {
            let mut b = SortBuffer::new(1 << 20, true);
            let mut pushed = Vec::new();
            for i in 0..(next() % 300) as u32 {
                let partition = (next() % 3) as u32;
                let key: Vec<u8> = (0..next() % 13).map(|_| b"ab"[(next() % 2) as usize]).collect();
                b.push(partition, &key, &i.to_be_bytes());
                pushed.push((partition, key, i.to_be_bytes().to_vec()));
            }
            b.sort();
            pushed.sort_by(|x, y| (x.0, &x.1).cmp(&(y.0, &y.1)));
            let got: Vec<(u32, Vec<u8>, Vec<u8>)> =
                (0..b.len()).map(|i| b.record(i)).map(|(p, k, v)| (p, k.to_vec(), v.to_vec())).collect();
            assert_eq!(got, pushed, "case {case} of seed {seed:#x}");
        }
    }

    #[test]
    fn prefetching_any_index_reads_nothing_and_changes_nothing() {
        let mut b = SortBuffer::new(1 << 20, true);
        for k in [b"c", b"a", b"b"] {
            b.push(0, k, b"v");
        }
        b.sort();
        for i in [0, 2, 3, usize::MAX] {
            b.prefetch(i);
        }
        // An empty slice has no line to ask for.
        prefetch(&[]);
        let keys: Vec<&[u8]> = (0..b.len()).map(|i| b.record(i).1).collect();
        assert_eq!(keys, [b"a", b"b", b"c"]);
    }

    #[test]
    fn is_full_at_its_capacity() {
        let mut b = SortBuffer::new(4096, false);
        let mut n = 0;
        while b.fits(10, 90) {
            b.push(0, &[0; 10], &[0; 90]);
            n += 1;
        }
        assert_eq!(n, 4096 / (100 + SORT_ENTRY_BYTES));
        assert!(b.used() <= 4096);
    }
}
