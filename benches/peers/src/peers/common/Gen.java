package peers.common;

import java.util.BitSet;
import java.util.HashMap;
import java.util.Map;

/**
 * The record generators of shared/WORKLOADS.md, bit for bit the same as
 * engine-adapter/src/workload/mod.rs. Java longs wrap like Rust's wrapping
 * arithmetic; {@code >>>} is the logical shift of a u64.
 */
public final class Gen {
    private Gen() {}

    public static final int W1_KEY_LEN = 10;
    public static final int W1_VALUE_LEN = 90;
    public static final int W1_RECORD_LEN = W1_KEY_LEN + W1_VALUE_LEN;

    private static final byte[] HEX = "0123456789abcdef".getBytes();

    /** The SplitMix64 finaliser, wrapping arithmetic. */
    public static long splitmix64(long x) {
        long z = x + 0x9E3779B97F4A7C15L;
        z = (z ^ (z >>> 30)) * 0xBF58476D1CE4E5B9L;
        z = (z ^ (z >>> 27)) * 0x94D049BB133111EBL;
        return z ^ (z >>> 31);
    }

    /** W1 key of record i: 8 big-endian bytes of h = splitmix64(seed ^ i), then the 2 low bytes of splitmix64(h). */
    public static byte[] w1Key(long seed, long i) {
        long h = splitmix64(seed ^ i);
        byte[] key = new byte[W1_KEY_LEN];
        for (int b = 0; b < 8; b++) {
            key[b] = (byte) (h >>> (56 - 8 * b));
        }
        long t = splitmix64(h);
        key[8] = (byte) (t >>> 8);
        key[9] = (byte) t;
        return key;
    }

    /** W1 value of record i: lowercase hex of splitmix64(h+1), splitmix64(h+2), ..., 16 digits each, cut at 90. */
    public static byte[] w1Value(long seed, long i) {
        long h = splitmix64(seed ^ i);
        byte[] value = new byte[W1_VALUE_LEN];
        for (int word = 0, pos = 0; pos < W1_VALUE_LEN; word++) {
            long x = splitmix64(h + word + 1);
            for (int j = 0; j < 16 && pos < W1_VALUE_LEN; j++, pos++) {
                value[pos] = HEX[(int) ((x >>> (60 - 4 * j)) & 0xf)];
            }
        }
        return value;
    }

    /** The value a W1 reducer sums for a key: its first 8 bytes as a big-endian u64. */
    public static long w1KeyValue(byte[] key) {
        long v = 0;
        for (int b = 0; b < 8; b++) {
            v = (v << 8) | (key[b] & 0xffL);
        }
        return v;
    }

    /** The last 2 key bytes as an int in [0, 65536). */
    public static int w1KeyTail(byte[] key) {
        return ((key[8] & 0xff) << 8) | (key[9] & 0xff);
    }

    /** W1 partition: xxhash64(key, seed 0) mod R (unsigned), as workload.rs's w1_partition. */
    public static int w1Partition(byte[] key, int partitions) {
        return (int) Long.remainderUnsigned(XxHash64.hash(key, 0, key.length, 0L), partitions);
    }

    /** W3 range partition: (first 8 key bytes as u64) * R >> 64, so partition order is key order. */
    public static int w3Partition(byte[] key, int partitions) {
        return w3PartitionOf(w1KeyValue(key), partitions);
    }

    /** The high 64 bits of the unsigned 128-bit product x * r (r >= 0). */
    public static int w3PartitionOf(long x, int partitions) {
        long r = partitions;
        return (int) (Math.multiplyHigh(x, r) + ((x >> 63) & r));
    }

    /** W2 key of record i: splitmix64(seed ^ i) mod K (unsigned). */
    public static long w2Key(long seed, long i, long keys) {
        return Long.remainderUnsigned(splitmix64(seed ^ i), Math.max(keys, 1));
    }

    /** W4 key of record i (its value is 1). */
    public static long w4Key(long seed, long i, long keys) {
        return w2Key(seed, i, keys);
    }

    /** First index of map m of M over N records: m*N/M, exact in 128 bits. */
    public static long mapStart(long records, int maps, int m) {
        return mulDiv(m, records, maps);
    }

    /** End (exclusive) of map m's range: (m+1)*N/M. */
    public static long mapEnd(long records, int maps, int m) {
        return mulDiv(m + 1, records, maps);
    }

    private static long mulDiv(long a, long b, long c) {
        return java.math.BigInteger.valueOf(a).multiply(java.math.BigInteger.valueOf(b))
                .divide(java.math.BigInteger.valueOf(c)).longValueExact();
    }

    /** Bytewise unsigned comparison of two keys (the W3 order). */
    public static int compareKeys(byte[] a, byte[] b) {
        return java.util.Arrays.compareUnsigned(a, b);
    }

    private static final Map<String, Long> CACHE = new HashMap<>();

    /** What W1 and W3 must add up to: the wrapping sum of splitmix64(seed ^ i) over i in [0, N). */
    public static synchronized long expectedKeySum(long seed, long records) {
        return CACHE.computeIfAbsent("w1/" + seed + "/" + records, k -> {
            long sum = 0;
            for (long i = 0; i < records; i++) {
                sum += splitmix64(seed ^ i);
            }
            return sum;
        });
    }

    /** The number of distinct W2 keys among records [0, N). */
    public static synchronized long expectedDistinctKeys(long seed, long records, long keys) {
        return CACHE.computeIfAbsent("w2/" + seed + "/" + records + "/" + keys, k -> {
            if (keys <= Integer.MAX_VALUE) {
                BitSet seen = new BitSet((int) Math.max(keys, 1));
                for (long i = 0; i < records; i++) {
                    seen.set((int) w2Key(seed, i, keys));
                }
                return (long) seen.cardinality();
            }
            long[] all = new long[Math.toIntExact(records)];
            for (int i = 0; i < all.length; i++) {
                all[i] = w2Key(seed, i, keys);
            }
            java.util.Arrays.sort(all);
            long distinct = 0;
            for (int i = 0; i < all.length; i++) {
                if (i == 0 || all[i] != all[i - 1]) distinct++;
            }
            return distinct;
        });
    }

    /** N(N-1)/2, wrapping like the i64 sum of values 0..N. */
    public static long expectedValueSum(long records) {
        return records % 2 == 0 ? (records / 2) * (records - 1) : records * ((records - 1) / 2);
    }

    public static String hex(long x) {
        return String.format("%016x", x);
    }
}
