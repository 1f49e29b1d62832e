package peers.spark;

import java.io.Serializable;
import java.util.ArrayList;
import java.util.Collections;
import java.util.Comparator;
import java.util.Iterator;
import java.util.List;
import java.util.NoSuchElementException;
import org.apache.spark.Partitioner;
import org.apache.spark.SparkConf;
import org.apache.spark.api.java.JavaPairRDD;
import org.apache.spark.api.java.JavaRDD;
import org.apache.spark.api.java.JavaSparkContext;
import peers.common.Cli;
import peers.common.Gen;
import peers.common.Report;
import peers.common.Window;
import scala.Tuple2;

/**
 * W1 exchange, W2 groupby and W3 sort of shared/WORKLOADS.md on Apache Spark
 * (RDD API, local mode, default sort-based shuffle, Kryo serializer).
 *
 * <pre>
 * SparkPeer --workload exchange|groupby|sort [--records N] [--maps M] [--partitions R]
 *           [--keys K] [--seed S] [--repeat 3] [--warmup-runs 1] [--cores C]
 *           [--local-dir DIR] [--out FILE] [--label TEXT]
 * </pre>
 */
public final class SparkPeer {

    /** W1: xxhash64(key, seed 0) mod R, the same partition function as workload.rs. */
    static final class XxPartitioner extends Partitioner {
        final int r;

        XxPartitioner(int r) {
            this.r = r;
        }

        @Override
        public int numPartitions() {
            return r;
        }

        @Override
        public int getPartition(Object key) {
            return Gen.w1Partition((byte[]) key, r);
        }

        @Override
        public boolean equals(Object o) {
            return o instanceof XxPartitioner && ((XxPartitioner) o).r == r;
        }

        @Override
        public int hashCode() {
            return r;
        }
    }

    /** W3: range partition from the known uniform key distribution, as workload.rs's w3_partition. */
    static final class RangePartitioner extends Partitioner {
        final int r;

        RangePartitioner(int r) {
            this.r = r;
        }

        @Override
        public int numPartitions() {
            return r;
        }

        @Override
        public int getPartition(Object key) {
            return Gen.w3Partition((byte[]) key, r);
        }

        @Override
        public boolean equals(Object o) {
            return o instanceof RangePartitioner && ((RangePartitioner) o).r == r;
        }

        @Override
        public int hashCode() {
            return 31 + r;
        }
    }

    /** Bytewise unsigned key order. */
    static final class KeyOrder implements Comparator<byte[]>, Serializable {
        @Override
        public int compare(byte[] a, byte[] b) {
            return Gen.compareKeys(a, b);
        }
    }

    /** Map task m's records: W1 (key, value) pairs for indices [m*N/M, (m+1)*N/M). */
    static Iterator<Tuple2<byte[], byte[]>> w1Map(long seed, long records, int maps, int m) {
        Window.mapStarted();
        final long end = Gen.mapEnd(records, maps, m);
        final long start = Gen.mapStart(records, maps, m);
        return new Iterator<>() {
            long i = start;

            @Override
            public boolean hasNext() {
                return i < end;
            }

            @Override
            public Tuple2<byte[], byte[]> next() {
                if (i >= end) throw new NoSuchElementException();
                long j = i++;
                return new Tuple2<>(Gen.w1Key(seed, j), Gen.w1Value(seed, j));
            }
        };
    }

    static Iterator<Tuple2<Long, Long>> w2Map(long seed, long records, long keys, int maps, int m) {
        Window.mapStarted();
        final long end = Gen.mapEnd(records, maps, m);
        final long start = Gen.mapStart(records, maps, m);
        return new Iterator<>() {
            long i = start;

            @Override
            public boolean hasNext() {
                return i < end;
            }

            @Override
            public Tuple2<Long, Long> next() {
                if (i >= end) throw new NoSuchElementException();
                long j = i++;
                return new Tuple2<>(Gen.w2Key(seed, j, keys), j);
            }
        };
    }

    public static void main(String[] args) throws Exception {
        Cli cli = new Cli(args);
        String workload = cli.str("workload", "exchange");
        long seed = cli.num("seed", 42);
        long records = cli.num("records", workload.equals("groupby") ? 20_000_000 : 10_000_000);
        int maps = cli.integer("maps", 4);
        int partitions = cli.integer("partitions", 16);
        long keys = cli.num("keys", 1_000_000);
        int repeat = cli.integer("repeat", 3);
        int warmups = cli.integer("warmup-runs", 1);
        int cores = cli.integer("cores", Runtime.getRuntime().availableProcessors());
        String out = cli.str("out", null);

        SparkConf conf = new SparkConf()
                .setMaster("local[" + cores + "]")
                .setAppName("peers-" + workload)
                .set("spark.serializer", "org.apache.spark.serializer.KryoSerializer")
                .set("spark.ui.enabled", "false")
                .set("spark.driver.host", "127.0.0.1")
                .set("spark.driver.bindAddress", "127.0.0.1")
                .set("spark.shuffle.manager", "sort");
        if (cli.has("local-dir")) conf.set("spark.local.dir", cli.str("local-dir", null));

        // Expected totals come straight from the generator, outside the timed window.
        // --check-seed (default: --seed) lets a test see that a wrong expectation fails the run.
        long checkSeed = cli.num("check-seed", seed);
        long expectedSum = Gen.expectedKeySum(checkSeed, records);
        long expectedGroups = workload.equals("groupby") ? Gen.expectedDistinctKeys(checkSeed, records, keys) : 0;

        List<Double> window = new ArrayList<>(), job = new ArrayList<>();
        String version;
        try (JavaSparkContext sc = new JavaSparkContext(conf)) {
            sc.setLogLevel("WARN");
            version = sc.version();
            List<Integer> mapIds = new ArrayList<>();
            for (int m = 0; m < maps; m++) mapIds.add(m);
            for (int run = -warmups; run < repeat; run++) {
                Window.reset();
                long t0 = System.nanoTime();
                switch (workload) {
                    case "exchange":
                        exchange(sc, mapIds, seed, records, maps, partitions, expectedSum);
                        break;
                    case "groupby":
                        groupby(sc, mapIds, seed, records, keys, maps, partitions, expectedGroups);
                        break;
                    case "sort":
                        sort(sc, mapIds, seed, records, maps, partitions, expectedSum);
                        break;
                    default:
                        throw new IllegalArgumentException("unknown workload " + workload);
                }
                double jobSeconds = (System.nanoTime() - t0) / 1e9;
                double w = Window.seconds();
                System.err.printf("spark %s run %s: %.3f s (job %.3f s), verified%n", workload,
                        run < 0 ? "warm-up" : Integer.toString(run + 1), w, jobSeconds);
                if (run >= 0) {
                    window.add(w);
                    job.add(jobSeconds);
                }
            }
        }
        Report r = new Report()
                .put("system", "spark")
                .put("version", version)
                .put("workload", workload)
                .put("mode", "sort-shuffle")
                .put("records", records)
                .put("maps", maps)
                .put("partitions", partitions);
        if (workload.equals("groupby")) r.put("keys", keys).put("groups", expectedGroups);
        r.put("seed", seed).put("input_bytes", workload.equals("groupby") ? records * 16 : records * Gen.W1_RECORD_LEN);
        r.times("", window);
        r.put("job_seconds", roundAll(job)).put("median_job_seconds", Report.round(Report.median(job)));
        r.put("mb_per_s", Report.round((double) (workload.equals("groupby") ? records * 16 : records * 100)
                / Report.median(window) / 1e6));
        r.put("verified", true)
                .put("warmup_runs", warmups)
                .put("cores", cores)
                .put("serializer", "kryo")
                .put("label", cli.str("label", ""));
        r.emit(out);
    }

    static List<Double> roundAll(List<Double> xs) {
        List<Double> r = new ArrayList<>();
        for (double x : xs) r.add(Report.round(x));
        return r;
    }

    /** W1: repartition by xxhash64(key) mod R; each reducer counts, sums key values and checks its partition. */
    static void exchange(JavaSparkContext sc, List<Integer> mapIds, long seed, long records, int maps, int partitions,
            long expectedSum) {
        JavaPairRDD<byte[], byte[]> input = sc.parallelize(mapIds, maps)
                .flatMapToPair(m -> w1Map(seed, records, maps, m));
        List<long[]> results = input.partitionBy(new XxPartitioner(partitions))
                .mapPartitionsWithIndex((idx, it) -> {
                    long count = 0, sum = 0, foreign = 0;
                    while (it.hasNext()) {
                        Tuple2<byte[], byte[]> rec = it.next();
                        byte[] key = rec._1();
                        if (key.length != Gen.W1_KEY_LEN || rec._2().length != Gen.W1_VALUE_LEN
                                || Gen.w1Partition(key, partitions) != idx) {
                            foreign++;
                        }
                        count++;
                        sum += Gen.w1KeyValue(key);
                    }
                    Window.reduceFinished();
                    return Collections.singletonList(new long[] {idx, count, sum, foreign}).iterator();
                }, true)
                .collect();
        checkW1(results, records, partitions, expectedSum, "spark exchange");
    }

    static void checkW1(List<long[]> results, long records, int partitions, long expectedSum, String what) {
        long count = 0, sum = 0;
        Report.check(results.size() == partitions, what + ": " + results.size() + " reducers reported, want " + partitions);
        for (long[] r : results) {
            Report.check(r[3] == 0, what + ": reducer " + r[0] + " got " + r[3] + " records of other partitions");
            count += r[1];
            sum += r[2];
        }
        Report.check(count == records, what + ": count " + count + " != " + records);
        Report.check(sum == expectedSum, what + ": key sum " + Gen.hex(sum) + " != " + Gen.hex(expectedSum));
    }

    /** W2: SUM(value) GROUP BY key with reduceByKey (map-side combining), HashPartitioner(R). */
    static void groupby(JavaSparkContext sc, List<Integer> mapIds, long seed, long records, long keys, int maps,
            int partitions, long expectedGroups) {
        JavaPairRDD<Long, Long> input = sc.parallelize(mapIds, maps)
                .flatMapToPair(m -> w2Map(seed, records, keys, maps, m));
        List<long[]> results = input.reduceByKey(Long::sum, partitions)
                .mapPartitionsWithIndex((idx, it) -> {
                    long groups = 0, sum = 0;
                    while (it.hasNext()) {
                        groups++;
                        sum += it.next()._2();
                    }
                    Window.reduceFinished();
                    return Collections.singletonList(new long[] {idx, groups, sum}).iterator();
                }, true)
                .collect();
        long groups = 0, sum = 0;
        for (long[] r : results) {
            groups += r[1];
            sum += r[2];
        }
        Report.check(groups == expectedGroups, "spark groupby: " + groups + " groups != " + expectedGroups);
        long want = Gen.expectedValueSum(records);
        Report.check(sum == want, "spark groupby: sum of sums " + sum + " != " + want);
    }

    /** W3: range partition by key (known uniform distribution), sort within partitions bytewise unsigned. */
    static void sort(JavaSparkContext sc, List<Integer> mapIds, long seed, long records, int maps, int partitions,
            long expectedSum) {
        JavaPairRDD<byte[], byte[]> input = sc.parallelize(mapIds, maps)
                .flatMapToPair(m -> w1Map(seed, records, maps, m));
        JavaRDD<Object[]> parts = input
                .repartitionAndSortWithinPartitions(new RangePartitioner(partitions), new KeyOrder())
                .mapPartitionsWithIndex((idx, it) -> {
                    long count = 0, sum = 0, foreign = 0, unordered = 0;
                    byte[] first = null, prev = null;
                    while (it.hasNext()) {
                        byte[] key = it.next()._1();
                        if (Gen.w3Partition(key, partitions) != idx) foreign++;
                        if (prev != null && Gen.compareKeys(prev, key) > 0) unordered++;
                        if (first == null) first = key;
                        prev = key;
                        count++;
                        sum += Gen.w1KeyValue(key);
                    }
                    Window.reduceFinished();
                    return Collections.singletonList(
                            new Object[] {new long[] {idx, count, sum, foreign, unordered}, first, prev}).iterator();
                }, true);
        checkW3(parts.collect(), records, partitions, expectedSum, "spark sort");
    }

    static void checkW3(List<Object[]> results, long records, int partitions, long expectedSum, String what) {
        results = new ArrayList<>(results);
        results.sort(Comparator.comparingLong(o -> ((long[]) o[0])[0]));
        Report.check(results.size() == partitions, what + ": " + results.size() + " partitions reported");
        long count = 0, sum = 0;
        byte[] lastKey = null;
        for (Object[] o : results) {
            long[] r = (long[]) o[0];
            Report.check(r[3] == 0, what + ": partition " + r[0] + " holds " + r[3] + " keys of other ranges");
            Report.check(r[4] == 0, what + ": partition " + r[0] + " is not sorted (" + r[4] + " inversions)");
            count += r[1];
            sum += r[2];
            byte[] first = (byte[]) o[1], last = (byte[]) o[2];
            if (first != null) {
                Report.check(lastKey == null || Gen.compareKeys(lastKey, first) <= 0,
                        what + ": partition " + r[0] + " starts below the previous partition's last key");
                lastKey = last;
            }
        }
        Report.check(count == records, what + ": count " + count + " != " + records);
        Report.check(sum == expectedSum, what + ": key sum " + Gen.hex(sum) + " != " + Gen.hex(expectedSum));
    }
}
