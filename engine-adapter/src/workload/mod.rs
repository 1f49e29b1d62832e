//! Record generators of the standard workloads (`shared/WORKLOADS.md`),
//! shared by the engine's examples, the end-to-end tests and the benchmark
//! harness so that all of them run exactly the same data, and ([`client`])
//! the W1 and W3 runners over the raw client.
//!
//! Record `i` is a pure function of `(seed, i)`, so any reducer can check
//! what it received against checksums computed straight from the generator.

pub mod client;

/// The SplitMix64 finaliser, with wrapping arithmetic.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// W1 key length: 8 bytes of `h` and 2 bytes of `splitmix64(h)`.
pub const W1_KEY_LEN: usize = 10;
/// W1 value length: hex digits, cut at 90.
pub const W1_VALUE_LEN: usize = 90;
/// W1 record size in bytes (key + value).
pub const W1_RECORD_LEN: usize = W1_KEY_LEN + W1_VALUE_LEN;

/// The lowercase hex digits of `v`, most significant first, eight at once:
/// the nibbles are spread one per byte, then turned into ASCII with one add
/// (and a second for the digits above 9) across all eight bytes.
fn hex8(v: u32) -> [u8; 8] {
    let mut x = u64::from(v);
    x = (x | (x << 16)) & 0x0000_FFFF_0000_FFFF;
    x = (x | (x << 8)) & 0x00FF_00FF_00FF_00FF;
    x = (x | (x << 4)) & 0x0F0F_0F0F_0F0F_0F0F; // byte k holds nibble k
    let letters = ((x + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101; // 1 where the nibble is above 9
    (x + 0x3030_3030_3030_3030 + letters * (b'a' - b'0' - 10) as u64).to_be_bytes()
}

/// W1 record `i`: the key is the 8 big-endian bytes of `h = splitmix64(seed ^ i)`
/// followed by the low 2 bytes of `splitmix64(h)` (big-endian); the value is the
/// lowercase hex of `splitmix64(h+1), splitmix64(h+2), ...`, 16 digits each, cut at 90.
pub fn w1_record(seed: u64, i: u64, key: &mut [u8; W1_KEY_LEN], value: &mut [u8; W1_VALUE_LEN]) {
    let h = splitmix64(seed ^ i);
    key[..8].copy_from_slice(&h.to_be_bytes());
    key[8..].copy_from_slice(&(splitmix64(h) as u16).to_be_bytes());
    for (word, chunk) in value.chunks_mut(16).enumerate() {
        let x = splitmix64(h.wrapping_add(word as u64 + 1));
        let mut digits = [0u8; 16];
        digits[..8].copy_from_slice(&hex8((x >> 32) as u32));
        digits[8..].copy_from_slice(&hex8(x as u32));
        chunk.copy_from_slice(&digits[..chunk.len()]);
    }
}

/// The W1 partition of a key: `xxhash64(key, seed 0) mod partitions`.
pub fn w1_partition(key: &[u8], partitions: u32) -> u32 {
    (xxhash_rust::xxh64::xxh64(key, 0) % u64::from(partitions)) as u32
}

/// The W3 range partition of a key: keys are uniform over their first 8 bytes,
/// so partition `r` holds keys whose first 8 bytes, as a big-endian u64, lie
/// in `[r * 2^64 / R, (r+1) * 2^64 / R)` — partition order is key order.
pub fn w3_partition(key: &[u8], partitions: u32) -> u32 {
    ((u128::from(w1_key_value(key)) * u128::from(partitions)) >> 64) as u32
}

/// The value a W1 reducer sums for a key: its first 8 bytes as a big-endian u64.
pub fn w1_key_value(key: &[u8]) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&key[..8]);
    u64::from_be_bytes(first)
}

/// W2 record `i`: key `splitmix64(seed ^ i) mod keys`, value `i`.
pub fn w2_record(seed: u64, i: u64, keys: u64) -> (u64, i64) {
    (splitmix64(seed ^ i) % keys.max(1), i as i64)
}

/// W4 key of record `i` (its value is 1): `splitmix64(seed ^ i) mod keys`.
pub fn w4_key(seed: u64, i: u64, keys: u64) -> u64 {
    splitmix64(seed ^ i) % keys.max(1)
}

/// The index range map `m` of `maps` generates out of `records`.
pub fn map_range(records: u64, maps: u32, m: u32) -> std::ops::Range<u64> {
    let (m, maps) = (u128::from(m), u128::from(maps));
    let start = (m * u128::from(records) / maps) as u64;
    let end = ((m + 1) * u128::from(records) / maps) as u64;
    start..end
}

/// What a W1 run must add up to: the record count and the wrapping sum of key values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct W1Totals {
    pub records: u64,
    pub key_sum: u64,
}

impl W1Totals {
    /// Adds one received key.
    pub fn add_key(&mut self, key: &[u8]) {
        self.records += 1;
        self.key_sum = self.key_sum.wrapping_add(w1_key_value(key));
    }

    /// Adds another reducer's totals.
    pub fn merge(&mut self, other: W1Totals) {
        self.records += other.records;
        self.key_sum = self.key_sum.wrapping_add(other.key_sum);
    }

    /// The expected totals of `records` records, straight from the generator.
    pub fn expected(seed: u64, records: u64) -> Self {
        let key_sum = (0..records).fold(0u64, |sum, i| sum.wrapping_add(splitmix64(seed ^ i)));
        Self { records, key_sum }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // Reference: successive outputs of the SplitMix64 generator seeded
        // with 0 are splitmix64(0), splitmix64(0x9E37...), ...
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(0x9E37_79B9_7F4A_7C15), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn w1_records_are_deterministic_and_well_formed() {
        let (mut k1, mut v1) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
        let (mut k2, mut v2) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
        w1_record(42, 7, &mut k1, &mut v1);
        w1_record(42, 7, &mut k2, &mut v2);
        assert_eq!((k1, v1), (k2, v2));
        assert_eq!(w1_key_value(&k1), splitmix64(42 ^ 7));
        assert!(v1.iter().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        let first_word = format!("{:016x}", splitmix64(splitmix64(42 ^ 7).wrapping_add(1)));
        assert_eq!(&v1[..16], first_word.as_bytes());
    }

    #[test]
    fn w1_values_are_exactly_the_hex_of_the_words_as_workloads_md_defines_them() {
        // The definition, digit by digit, against the fast formatting.
        let reference = |seed: u64, i: u64| {
            let h = splitmix64(seed ^ i);
            let mut value = String::new();
            for word in 1..=6u64 {
                value.push_str(&format!("{:016x}", splitmix64(h.wrapping_add(word))));
            }
            value.truncate(W1_VALUE_LEN);
            value
        };
        let (mut k, mut v) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
        for i in (0..100_000).chain([u64::MAX - 1, u64::MAX]) {
            w1_record(42, i, &mut k, &mut v);
            assert_eq!(std::str::from_utf8(&v).unwrap(), reference(42, i), "record {i}");
        }
        for v in [0u32, 9, 10, 15, 0x89ab_cdef, u32::MAX] {
            assert_eq!(std::str::from_utf8(&hex8(v)).unwrap(), format!("{v:08x}"));
        }
    }

    #[test]
    fn w3_partitions_are_ordered_ranges_of_the_key() {
        let key = |first: u64| {
            let mut k = [0u8; W1_KEY_LEN];
            k[..8].copy_from_slice(&first.to_be_bytes());
            k
        };
        assert_eq!(w3_partition(&key(0), 16), 0);
        assert_eq!(w3_partition(&key(u64::MAX), 16), 15);
        assert_eq!(w3_partition(&key(1 << 60), 16), 1);
        assert_eq!(w3_partition(&key((1 << 60) - 1), 16), 0);
    }

    #[test]
    fn map_ranges_cover_every_index_once() {
        let ranges: Vec<_> = (0..7).map(|m| map_range(1_000_003, 7, m)).collect();
        assert_eq!(ranges[0].start, 0);
        assert_eq!(ranges[6].end, 1_000_003);
        assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
    }
}
