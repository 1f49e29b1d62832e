package peers.common;

/**
 * Prints generator test vectors for check_generators.py, and checks the
 * reference values of splitmix64. Usage: SelfTest [--records N] [--seed S] [--keys K] [--partitions R]
 */
public final class SelfTest {
    public static void main(String[] args) {
        Cli cli = new Cli(args);
        long n = cli.num("records", 1000);
        long seed = cli.num("seed", 42);
        long keys = cli.num("keys", 1000);
        int r = cli.integer("partitions", 16);
        if (Gen.splitmix64(0) != 0xE220A8397B1DCDAFL) throw new AssertionError("splitmix64(0)");
        if (Gen.splitmix64(0x9E3779B97F4A7C15L) != 0x6E789E6AA1B965F4L) throw new AssertionError("splitmix64(golden)");
        System.out.println("splitmix64(0) " + Gen.hex(Gen.splitmix64(0)));
        System.out.println("splitmix64(0x9e3779b97f4a7c15) " + Gen.hex(Gen.splitmix64(0x9E3779B97F4A7C15L)));
        System.out.println("w1_key_sum " + n + " " + Gen.hex(Gen.expectedKeySum(seed, n)));
        System.out.println("w2_distinct " + n + " " + keys + " " + Gen.expectedDistinctKeys(seed, n, keys));
        System.out.println("w2_value_sum " + n + " " + Gen.expectedValueSum(n));
        long partSum = 0, rangeSum = 0;
        for (long i = 0; i < n; i++) {
            byte[] k = Gen.w1Key(seed, i);
            partSum = partSum * 31 + Gen.w1Partition(k, r);
            rangeSum = rangeSum * 31 + Gen.w3Partition(k, r);
        }
        System.out.println("w1_partition_digest " + n + " " + r + " " + Gen.hex(partSum));
        System.out.println("w3_partition_digest " + n + " " + r + " " + Gen.hex(rangeSum));
        long w2 = 0;
        for (long i = 0; i < n; i++) w2 = w2 * 31 + Gen.w2Key(seed, i, keys);
        System.out.println("w2_key_digest " + n + " " + keys + " " + Gen.hex(w2));
        for (long i : new long[] {0, 1, 7, n - 1}) {
            System.out.println("w1_record " + i + " " + new String(toHex(Gen.w1Key(seed, i))) + " "
                    + new String(Gen.w1Value(seed, i)));
        }
        for (int m = 0; m < 4; m++) {
            System.out.println("map_range " + n + " 4 " + m + " " + Gen.mapStart(n, 4, m) + " " + Gen.mapEnd(n, 4, m));
        }
        System.out.println("xxh64_empty " + Gen.hex(XxHash64.hash(new byte[0], 0, 0, 0)));
        byte[] abc = new byte[40];
        for (int i = 0; i < abc.length; i++) abc[i] = (byte) (i * 7 + 1);
        for (int len : new int[] {1, 3, 4, 9, 10, 31, 32, 40}) {
            System.out.println("xxh64_bytes " + len + " " + Gen.hex(XxHash64.hash(abc, 0, len, 0)));
        }
    }

    private static String toHex(byte[] b) {
        StringBuilder s = new StringBuilder();
        for (byte x : b) s.append(String.format("%02x", x & 0xff));
        return s.toString();
    }
}
