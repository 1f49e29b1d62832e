package peers.flink;

import java.io.File;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.locks.LockSupport;
import org.apache.flink.api.common.RuntimeExecutionMode;
import org.apache.flink.api.common.BatchShuffleMode;
import org.apache.flink.api.common.eventtime.WatermarkStrategy;
import org.apache.flink.api.common.functions.Partitioner;
import org.apache.flink.api.common.functions.ReduceFunction;
import org.apache.flink.api.common.operators.Order;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.api.java.functions.KeySelector;
import org.apache.flink.api.java.tuple.Tuple2;
import org.apache.flink.api.java.tuple.Tuple3;
import org.apache.flink.configuration.Configuration;
import org.apache.flink.configuration.CoreOptions;
import org.apache.flink.configuration.ExecutionOptions;
import org.apache.flink.configuration.MemorySize;
import org.apache.flink.configuration.RestartStrategyOptions;
import org.apache.flink.configuration.RestOptions;
import org.apache.flink.configuration.TaskManagerOptions;
import org.apache.flink.runtime.jobgraph.JobGraph;
import org.apache.flink.runtime.jobmaster.JobResult;
import org.apache.flink.runtime.minicluster.MiniCluster;
import org.apache.flink.runtime.minicluster.MiniClusterConfiguration;
import org.apache.flink.streaming.api.datastream.DataStream;
import org.apache.flink.streaming.api.environment.StreamExecutionEnvironment;
import org.apache.flink.streaming.api.functions.sink.RichSinkFunction;
import org.apache.flink.streaming.api.functions.source.RichParallelSourceFunction;
import org.apache.flink.streaming.api.operators.AbstractStreamOperator;
import org.apache.flink.streaming.api.operators.BoundedOneInput;
import org.apache.flink.streaming.api.operators.ChainingStrategy;
import org.apache.flink.streaming.api.operators.OneInputStreamOperator;
import org.apache.flink.streaming.runtime.streamrecord.StreamRecord;
import org.apache.flink.util.FlinkRuntimeException;
import peers.common.Cli;
import peers.common.Gen;
import peers.common.LogHistogram;
import peers.common.LongLongMap;
import peers.common.Report;
import peers.common.Window;

/**
 * W1 exchange, W2 groupby, W3 sort and W4 stream of shared/WORKLOADS.md on
 * Apache Flink (DataStream API) in a local MiniCluster started once per JVM.
 *
 * <pre>
 * FlinkPeer --workload exchange|groupby|sort --mode blocking|hybrid-full|hybrid-selective|streaming
 *           [--records N] [--maps M] [--partitions R] [--keys K] [--seed S] [--repeat 3] [--warmup-runs 1]
 * FlinkPeer --workload stream [--buffer-timeout-ms 100] [--keys 100000] [--maps 2] [--partitions 4]
 *           [--rate R | search] [--warmup-seconds 5] [--seconds 30] [--probe-warmup-seconds 2] [--probe-seconds 5]
 * common:   [--slots S] [--managed-memory 1g] [--network-memory 512m] [--tmp-dir DIR] [--out FILE]
 * </pre>
 */
public final class FlinkPeer {

    /** What each reducer subtask reports when its input ends, by subtask index (tasks run in this JVM). */
    static final Map<Integer, Object[]> RESULTS = new ConcurrentHashMap<>();

    static final TypeInformation<Tuple2<byte[], byte[]>> W1_TYPE =
            Types.TUPLE(Types.PRIMITIVE_ARRAY(Types.BYTE), Types.PRIMITIVE_ARRAY(Types.BYTE));
    static final TypeInformation<Tuple2<Long, Long>> W2_TYPE = Types.TUPLE(Types.LONG, Types.LONG);
    static final TypeInformation<Tuple3<Long, Long, Long>> W4_TYPE = Types.TUPLE(Types.LONG, Types.LONG, Types.LONG);

    // ---------------------------------------------------------------- W1 ----

    static final class W1Record implements MapTaskSource.RecordFn<Tuple2<byte[], byte[]>> {
        final long seed;

        W1Record(long seed) {
            this.seed = seed;
        }

        @Override
        public Tuple2<byte[], byte[]> make(long i) {
            return Tuple2.of(Gen.w1Key(seed, i), Gen.w1Value(seed, i));
        }
    }

    static final class KeyOf implements KeySelector<Tuple2<byte[], byte[]>, byte[]> {
        @Override
        public byte[] getKey(Tuple2<byte[], byte[]> r) {
            return r.f0;
        }
    }

    /** W1: xxhash64(key, seed 0) mod R; channel r feeds reducer subtask r. */
    static final class XxPartitioner implements Partitioner<byte[]> {
        @Override
        public int partition(byte[] key, int partitions) {
            return Gen.w1Partition(key, partitions);
        }
    }

    static final class W1Sink extends RichSinkFunction<Tuple2<byte[], byte[]>> {
        final int partitions;
        transient int idx;
        transient long count, sum, foreign;

        W1Sink(int partitions) {
            this.partitions = partitions;
        }

        @Override
        public void open(org.apache.flink.api.common.functions.OpenContext ctx) {
            idx = getRuntimeContext().getTaskInfo().getIndexOfThisSubtask();
        }

        @Override
        public void invoke(Tuple2<byte[], byte[]> r, Context ctx) {
            if (r.f0.length != Gen.W1_KEY_LEN || r.f1.length != Gen.W1_VALUE_LEN
                    || Gen.w1Partition(r.f0, partitions) != idx) {
                foreign++;
            }
            count++;
            sum += Gen.w1KeyValue(r.f0);
        }

        @Override
        public void finish() {
            RESULTS.put(idx, new Object[] {new long[] {idx, count, sum, foreign}});
            Window.reduceFinished();
        }
    }

    // ---------------------------------------------------------------- W2 ----

    static final class W2Record implements MapTaskSource.RecordFn<Tuple2<Long, Long>> {
        final long seed, keys;

        W2Record(long seed, long keys) {
            this.seed = seed;
            this.keys = keys;
        }

        @Override
        public Tuple2<Long, Long> make(long i) {
            return Tuple2.of(Gen.w2Key(seed, i, keys), i);
        }
    }

    /**
     * Map-side combining, chained to each map task: SUM(value) per key in a
     * hash map, emitted when the map's input ends. (The DataStream API has no
     * combiner of its own; Spark's reduceByKey does the same in its map tasks.)
     */
    static final class MapSideCombine extends AbstractStreamOperator<Tuple2<Long, Long>>
            implements OneInputStreamOperator<Tuple2<Long, Long>, Tuple2<Long, Long>>, BoundedOneInput {
        transient LongLongMap sums;

        MapSideCombine() {
            chainingStrategy = ChainingStrategy.ALWAYS;
        }

        @Override
        public void processElement(StreamRecord<Tuple2<Long, Long>> r) {
            if (sums == null) sums = new LongLongMap(1 << 16);
            sums.add(r.getValue().f0, r.getValue().f1);
        }

        @Override
        public void endInput() throws Exception {
            if (sums == null) return;
            StreamRecord<Tuple2<Long, Long>> reuse = new StreamRecord<>(null);
            sums.forEach((k, v) -> output.collect(reuse.replace(Tuple2.of(k, v))));
            sums = null;
        }
    }

    static final class W2Key implements KeySelector<Tuple2<Long, Long>, Long> {
        @Override
        public Long getKey(Tuple2<Long, Long> r) {
            return r.f0;
        }
    }

    static final class Sum implements ReduceFunction<Tuple2<Long, Long>> {
        @Override
        public Tuple2<Long, Long> reduce(Tuple2<Long, Long> a, Tuple2<Long, Long> b) {
            return Tuple2.of(a.f0, a.f1 + b.f1);
        }
    }

    /** Keeps the latest sum per key (batch: the one final sum; streaming: every update), reports at end of input. */
    static final class W2Sink extends RichSinkFunction<Tuple2<Long, Long>> {
        transient LongLongMap latest;
        transient int idx;

        @Override
        public void open(org.apache.flink.api.common.functions.OpenContext ctx) {
            idx = getRuntimeContext().getTaskInfo().getIndexOfThisSubtask();
            latest = new LongLongMap(1 << 16);
        }

        @Override
        public void invoke(Tuple2<Long, Long> r, Context ctx) {
            latest.put(r.f0, r.f1);
        }

        @Override
        public void finish() {
            RESULTS.put(idx, new Object[] {new long[] {idx, latest.size(), latest.valueSum()}});
            Window.reduceFinished();
        }
    }

    // ---------------------------------------------------------------- W3 ----

    /** W3: range partition from the known uniform key distribution, as workload.rs's w3_partition. */
    static final class RangePartitioner implements Partitioner<byte[]> {
        @Override
        public int partition(byte[] key, int partitions) {
            return Gen.w3Partition(key, partitions);
        }
    }

    /**
     * The sort key: (first 8 bytes as u64 with the sign bit flipped, last 2
     * bytes) so that Flink's signed long order and int order are the bytewise
     * unsigned order of the 10-byte key.
     */
    static final class SortKey implements KeySelector<Tuple2<byte[], byte[]>, Tuple2<Long, Integer>> {
        @Override
        public Tuple2<Long, Integer> getKey(Tuple2<byte[], byte[]> r) {
            return Tuple2.of(Gen.w1KeyValue(r.f0) ^ Long.MIN_VALUE, Gen.w1KeyTail(r.f0));
        }
    }

    static final class W3Sink extends RichSinkFunction<Tuple2<byte[], byte[]>> {
        final int partitions;
        transient int idx;
        transient long count, sum, foreign, unordered;
        transient byte[] first, prev;

        W3Sink(int partitions) {
            this.partitions = partitions;
        }

        @Override
        public void open(org.apache.flink.api.common.functions.OpenContext ctx) {
            idx = getRuntimeContext().getTaskInfo().getIndexOfThisSubtask();
        }

        @Override
        public void invoke(Tuple2<byte[], byte[]> r, Context ctx) {
            byte[] key = r.f0;
            if (Gen.w3Partition(key, partitions) != idx) foreign++;
            if (prev != null && Gen.compareKeys(prev, key) > 0) unordered++;
            if (first == null) first = key;
            prev = key;
            count++;
            sum += Gen.w1KeyValue(key);
        }

        @Override
        public void finish() {
            RESULTS.put(idx, new Object[] {new long[] {idx, count, sum, foreign, unordered}, first, prev});
            Window.reduceFinished();
        }
    }

    // ---------------------------------------------------------------- W4 ----

    static final AtomicLong EMITTED = new AtomicLong();
    static volatile boolean stop, measuring;
    /** The latency histogram of the current probe (reducers merge theirs in at end of input). */
    static volatile LogHistogram latency = new LogHistogram();
    static final AtomicLong FINAL_COUNT_SUM = new AtomicLong();

    /** Map task m emits records i = m, m+M, m+2M, ... at rate/M per second: (key, 1, creation nanoTime). */
    static final class RateSource extends RichParallelSourceFunction<Tuple3<Long, Long, Long>> {
        final long seed, keys;
        final double rate;

        RateSource(long seed, long keys, double rate) {
            this.seed = seed;
            this.keys = keys;
            this.rate = rate;
        }

        @Override
        public void run(SourceContext<Tuple3<Long, Long, Long>> ctx) {
            int m = getRuntimeContext().getTaskInfo().getIndexOfThisSubtask();
            int maps = getRuntimeContext().getTaskInfo().getNumberOfParallelSubtasks();
            double perNano = rate / maps / 1e9;
            long t0 = System.nanoTime();
            long sent = 0, i = m;
            while (!stop) {
                long due = (long) ((System.nanoTime() - t0) * perNano);
                if (sent >= due) {
                    LockSupport.parkNanos(100_000);
                    continue;
                }
                long batch = Math.min(due - sent, 1000);
                synchronized (ctx.getCheckpointLock()) {
                    for (long b = 0; b < batch; b++, i += maps) {
                        ctx.collect(Tuple3.of(Gen.w4Key(seed, i, keys), 1L, System.nanoTime()));
                    }
                }
                sent += batch;
                EMITTED.addAndGet(batch);
            }
        }

        @Override
        public void cancel() {
            stop = true;
        }
    }

    static final class W4Key implements KeySelector<Tuple3<Long, Long, Long>, Long> {
        @Override
        public Long getKey(Tuple3<Long, Long, Long> r) {
            return r.f0;
        }
    }

    /** Running count per key; the update carries the creation time of the record that caused it. */
    static final class Count implements ReduceFunction<Tuple3<Long, Long, Long>> {
        @Override
        public Tuple3<Long, Long, Long> reduce(Tuple3<Long, Long, Long> a, Tuple3<Long, Long, Long> b) {
            return Tuple3.of(a.f0, a.f1 + b.f1, b.f2);
        }
    }

    /** Chained to the reducer: records now - creation time of every update, keeps the latest count per key. */
    static final class LatencySink extends RichSinkFunction<Tuple3<Long, Long, Long>> {
        transient LogHistogram hist;
        transient LongLongMap latest;

        @Override
        public void open(org.apache.flink.api.common.functions.OpenContext ctx) {
            hist = new LogHistogram();
            latest = new LongLongMap(1 << 15);
        }

        @Override
        public void invoke(Tuple3<Long, Long, Long> r, Context ctx) {
            if (measuring) hist.record((System.nanoTime() - r.f2) / 1000);
            latest.put(r.f0, r.f1);
        }

        @Override
        public void finish() {
            latency.merge(hist);
            FINAL_COUNT_SUM.addAndGet(latest.valueSum());
        }
    }

    // ------------------------------------------------------------ driver ----

    final MiniCluster cluster;
    final Cli cli;
    String exchanges;

    FlinkPeer(MiniCluster cluster, Cli cli) {
        this.cluster = cluster;
        this.cli = cli;
    }

    static Configuration jobConfig(String mode, long bufferTimeoutMs) {
        Configuration c = new Configuration();
        c.set(RestartStrategyOptions.RESTART_STRATEGY, "none");
        switch (mode) {
            case "blocking":
                c.set(ExecutionOptions.RUNTIME_MODE, RuntimeExecutionMode.BATCH);
                c.set(ExecutionOptions.BATCH_SHUFFLE_MODE, BatchShuffleMode.ALL_EXCHANGES_BLOCKING);
                break;
            case "hybrid-full":
                c.set(ExecutionOptions.RUNTIME_MODE, RuntimeExecutionMode.BATCH);
                c.set(ExecutionOptions.BATCH_SHUFFLE_MODE, BatchShuffleMode.ALL_EXCHANGES_HYBRID_FULL);
                break;
            case "hybrid-selective":
                c.set(ExecutionOptions.RUNTIME_MODE, RuntimeExecutionMode.BATCH);
                c.set(ExecutionOptions.BATCH_SHUFFLE_MODE, BatchShuffleMode.ALL_EXCHANGES_HYBRID_SELECTIVE);
                break;
            case "streaming":
                c.set(ExecutionOptions.RUNTIME_MODE, RuntimeExecutionMode.STREAMING);
                c.set(ExecutionOptions.BUFFER_TIMEOUT, java.time.Duration.ofMillis(bufferTimeoutMs));
                break;
            default:
                throw new IllegalArgumentException("unknown mode " + mode);
        }
        return c;
    }

    /** Submits the job built on env to the running MiniCluster and waits for it; throws if it failed. */
    void runJob(StreamExecutionEnvironment env) throws Exception {
        JobGraph job = env.getStreamGraph().getJobGraph();
        if (exchanges == null) {
            // What the job graph really asks for: the result partition type of every exchange.
            StringBuilder b = new StringBuilder();
            for (org.apache.flink.runtime.jobgraph.JobVertex v : job.getVertices()) {
                for (org.apache.flink.runtime.jobgraph.IntermediateDataSet d : v.getProducedDataSets()) {
                    if (b.length() > 0) b.append(", ");
                    b.append(v.getName().replaceAll("\\s+", " ")).append(" -> ").append(d.getResultType());
                }
            }
            exchanges = b.toString();
            System.err.println("flink job graph exchanges: " + exchanges);
        }
        cluster.submitJob(job).get();
        JobResult result = cluster.requestJobResult(job.getJobID()).get();
        if (!result.isSuccess()) {
            throw new FlinkRuntimeException("job failed",
                    result.getSerializedThrowable().get().deserializeError(FlinkPeer.class.getClassLoader()));
        }
    }

    public static void main(String[] args) throws Exception {
        Cli cli = new Cli(args);
        String workload = cli.str("workload", "exchange");
        boolean stream = workload.equals("stream");
        int maps = cli.integer("maps", stream ? 2 : 4);
        int partitions = cli.integer("partitions", stream ? 4 : 16);

        Configuration c = new Configuration();
        int slots = cli.integer("slots", Math.max(maps, partitions));
        c.set(TaskManagerOptions.NUM_TASK_SLOTS, slots);
        c.set(TaskManagerOptions.MANAGED_MEMORY_SIZE, MemorySize.parse(cli.str("managed-memory", "1g")));
        MemorySize net = MemorySize.parse(cli.str("network-memory", "512m"));
        c.set(TaskManagerOptions.NETWORK_MEMORY_MIN, net);
        c.set(TaskManagerOptions.NETWORK_MEMORY_MAX, net);
        c.set(RestOptions.BIND_ADDRESS, "127.0.0.1");
        c.set(RestOptions.ADDRESS, "127.0.0.1");
        if (cli.has("tmp-dir")) {
            new File(cli.str("tmp-dir", null)).mkdirs();
            c.set(CoreOptions.TMP_DIRS, cli.str("tmp-dir", null));
        }
        MiniClusterConfiguration mcc = new MiniClusterConfiguration.Builder()
                .setConfiguration(c)
                .withRandomPorts()
                .setNumTaskManagers(1)
                .setNumSlotsPerTaskManager(slots)
                .build();
        int code = 0;
        try (MiniCluster cluster = new MiniCluster(mcc)) {
            cluster.start();
            FlinkPeer peer = new FlinkPeer(cluster, cli);
            if (stream) {
                peer.stream(maps, partitions, slots);
            } else {
                peer.batch(workload, maps, partitions, slots);
            }
        } catch (Throwable t) {
            t.printStackTrace();
            code = 1;
        }
        System.out.flush();
        // Flink leaves non-daemon threads behind; leave explicitly.
        Runtime.getRuntime().halt(code);
    }

    void batch(String workload, int maps, int partitions, int slots) throws Exception {
        String mode = cli.str("mode", "blocking");
        long seed = cli.num("seed", 42);
        long records = cli.num("records", workload.equals("groupby") ? 20_000_000 : 10_000_000);
        long keys = cli.num("keys", 1_000_000);
        int repeat = cli.integer("repeat", 3);
        int warmups = cli.integer("warmup-runs", 1);
        long bufferTimeout = cli.num("buffer-timeout-ms", 100);
        boolean combine = Boolean.parseBoolean(cli.str("map-side-combine", "true"));

        // --check-seed (default: --seed) lets a test see that a wrong expectation fails the run.
        long checkSeed = cli.num("check-seed", seed);
        long expectedSum = Gen.expectedKeySum(checkSeed, records);
        long expectedGroups = workload.equals("groupby") ? Gen.expectedDistinctKeys(checkSeed, records, keys) : 0;

        List<Double> window = new ArrayList<>(), job = new ArrayList<>();
        for (int run = -warmups; run < repeat; run++) {
            RESULTS.clear();
            Window.reset();
            StreamExecutionEnvironment env = new StreamExecutionEnvironment(jobConfig(mode, bufferTimeout));
            long t0 = System.nanoTime();
            switch (workload) {
                case "exchange": {
                    env.fromSource(new MapTaskSource<>(records, maps, new W1Record(seed), W1_TYPE),
                                    WatermarkStrategy.noWatermarks(), "w1-maps")
                            .setParallelism(maps)
                            .partitionCustom(new XxPartitioner(), new KeyOf())
                            .addSink(new W1Sink(partitions))
                            .name("w1-reducers")
                            .setParallelism(partitions);
                    runJob(env);
                    checkW1(records, partitions, expectedSum);
                    break;
                }
                case "groupby": {
                    DataStream<Tuple2<Long, Long>> mapped = env
                            .fromSource(new MapTaskSource<>(records, maps, new W2Record(seed, keys), W2_TYPE),
                                    WatermarkStrategy.noWatermarks(), "w2-maps")
                            .setParallelism(maps);
                    if (combine) {
                        mapped = mapped.transform("map-side-combine", W2_TYPE, new MapSideCombine())
                                .setParallelism(maps);
                    }
                    mapped.keyBy(new W2Key())
                            .reduce(new Sum())
                            .name("w2-reducers")
                            .setParallelism(partitions)
                            .addSink(new W2Sink())
                            .name("w2-sink")
                            .setParallelism(partitions);
                    runJob(env);
                    checkW2(records, partitions, expectedGroups);
                    break;
                }
                case "sort": {
                    DataStream<Tuple2<byte[], byte[]>> ranged = env
                            .fromSource(new MapTaskSource<>(records, maps, new W1Record(seed), W1_TYPE),
                                    WatermarkStrategy.noWatermarks(), "w3-maps")
                            .setParallelism(maps)
                            .partitionCustom(new RangePartitioner(), new KeyOf());
                    ranged.fullWindowPartition()
                            .sortPartition(new SortKey(), Order.ASCENDING)
                            .name("w3-sort")
                            .setParallelism(partitions)
                            .addSink(new W3Sink(partitions))
                            .name("w3-check")
                            .setParallelism(partitions);
                    runJob(env);
                    checkW3(records, partitions, expectedSum);
                    break;
                }
                default:
                    throw new IllegalArgumentException("unknown workload " + workload);
            }
            double jobSeconds = (System.nanoTime() - t0) / 1e9;
            double w = Window.seconds();
            System.err.printf("flink %s %s run %s: %.3f s (job %.3f s), verified%n", workload, mode,
                    run < 0 ? "warm-up" : Integer.toString(run + 1), w, jobSeconds);
            if (run >= 0) {
                window.add(w);
                job.add(jobSeconds);
            }
        }
        Report r = new Report()
                .put("system", "flink")
                .put("version", org.apache.flink.runtime.util.EnvironmentInformation.getVersion())
                .put("workload", workload)
                .put("mode", mode)
                .put("records", records)
                .put("maps", maps)
                .put("partitions", partitions);
        if (workload.equals("groupby")) r.put("keys", keys).put("groups", expectedGroups);
        long inputBytes = workload.equals("groupby") ? records * 16 : records * Gen.W1_RECORD_LEN;
        r.put("seed", seed).put("input_bytes", inputBytes);
        r.times("", window);
        List<Double> jr = new ArrayList<>();
        for (double x : job) jr.add(Report.round(x));
        r.put("job_seconds", jr).put("median_job_seconds", Report.round(Report.median(job)));
        r.put("mb_per_s", Report.round(inputBytes / Report.median(window) / 1e6));
        r.put("verified", true).put("warmup_runs", warmups).put("slots", slots)
                .put("serializer", "flink-tuple");
        if (mode.equals("streaming")) r.put("buffer_timeout_ms", bufferTimeout);
        if (workload.equals("groupby")) r.put("map_side_combine", combine);
        r.put("exchanges", exchanges);
        r.put("label", cli.str("label", ""));
        r.emit(cli.str("out", null));
    }

    static void checkW1(long records, int partitions, long expectedSum) {
        Report.check(RESULTS.size() == partitions, "flink exchange: " + RESULTS.size() + " reducers reported");
        long count = 0, sum = 0;
        for (Object[] o : RESULTS.values()) {
            long[] r = (long[]) o[0];
            Report.check(r[3] == 0, "flink exchange: reducer " + r[0] + " got " + r[3] + " records of other partitions");
            count += r[1];
            sum += r[2];
        }
        Report.check(count == records, "flink exchange: count " + count + " != " + records);
        Report.check(sum == expectedSum, "flink exchange: key sum " + Gen.hex(sum) + " != " + Gen.hex(expectedSum));
    }

    static void checkW2(long records, int partitions, long expectedGroups) {
        Report.check(RESULTS.size() == partitions, "flink groupby: " + RESULTS.size() + " reducers reported");
        long groups = 0, sum = 0;
        for (Object[] o : RESULTS.values()) {
            long[] r = (long[]) o[0];
            groups += r[1];
            sum += r[2];
        }
        Report.check(groups == expectedGroups, "flink groupby: " + groups + " groups != " + expectedGroups);
        long want = Gen.expectedValueSum(records);
        Report.check(sum == want, "flink groupby: sum of sums " + sum + " != " + want);
    }

    static void checkW3(long records, int partitions, long expectedSum) {
        Report.check(RESULTS.size() == partitions, "flink sort: " + RESULTS.size() + " partitions reported");
        long count = 0, sum = 0;
        byte[] lastKey = null;
        for (int p = 0; p < partitions; p++) {
            Object[] o = RESULTS.get(p);
            Report.check(o != null, "flink sort: partition " + p + " did not report");
            long[] r = (long[]) o[0];
            Report.check(r[3] == 0, "flink sort: partition " + p + " holds " + r[3] + " keys of other ranges");
            Report.check(r[4] == 0, "flink sort: partition " + p + " is not sorted (" + r[4] + " inversions)");
            count += r[1];
            sum += r[2];
            byte[] first = (byte[]) o[1], last = (byte[]) o[2];
            if (first != null) {
                Report.check(lastKey == null || Gen.compareKeys(lastKey, first) <= 0,
                        "flink sort: partition " + p + " starts below the previous partition's last key");
                lastKey = last;
            }
        }
        Report.check(count == records, "flink sort: count " + count + " != " + records);
        Report.check(sum == expectedSum, "flink sort: key sum " + Gen.hex(sum) + " != " + Gen.hex(expectedSum));
    }

    // ------------------------------------------------------------ W4 driver ----

    /** One fixed-rate W4 run. */
    static final class Probe {
        double rate, achieved, p50, p99, p999;
        long records;

        boolean sustained() {
            return p99 < 100.0 && achieved >= 0.95 * rate;
        }

        Map<String, Object> json() {
            Map<String, Object> m = new java.util.LinkedHashMap<>();
            m.put("rate", rate);
            m.put("achieved_rate", Math.round(achieved));
            m.put("p50_ms", Report.round(p50));
            m.put("p99_ms", Report.round(p99));
            m.put("p999_ms", Report.round(p999));
            m.put("records", records);
            m.put("sustained", sustained());
            return m;
        }
    }

    Probe streamAt(double rate, int maps, int partitions, long bufferTimeout, double warmupSeconds, double seconds)
            throws Exception {
        long seed = cli.num("seed", 42);
        long keys = cli.num("keys", 100_000);
        EMITTED.set(0);
        FINAL_COUNT_SUM.set(0);
        stop = false;
        measuring = false;
        latency = new LogHistogram();
        StreamExecutionEnvironment env = new StreamExecutionEnvironment(jobConfig("streaming", bufferTimeout));
        env.addSource(new RateSource(seed, keys, rate), "w4-sources", W4_TYPE)
                .setParallelism(maps)
                .keyBy(new W4Key())
                .reduce(new Count())
                .name("w4-counts")
                .setParallelism(partitions)
                .addSink(new LatencySink())
                .name("w4-latency")
                .setParallelism(partitions);
        long[] measured = new long[1];
        Thread timer = new Thread(() -> {
            try {
                Thread.sleep((long) (warmupSeconds * 1000));
                long from = EMITTED.get();
                measuring = true;
                Thread.sleep((long) (seconds * 1000));
                measured[0] = EMITTED.get() - from;
                measuring = false;
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            } finally {
                stop = true;
            }
        }, "w4-timer");
        timer.start();
        runJob(env);
        timer.join();
        long emitted = EMITTED.get(), counted = FINAL_COUNT_SUM.get();
        Report.check(counted == emitted,
                "flink stream: the final counts add up to " + counted + ", but the sources emitted " + emitted);
        Probe p = new Probe();
        p.rate = rate;
        p.achieved = measured[0] / seconds;
        p.p50 = latency.valueAt(0.5) / 1000.0;
        p.p99 = latency.valueAt(0.99) / 1000.0;
        p.p999 = latency.valueAt(0.999) / 1000.0;
        p.records = emitted;
        System.err.printf("flink stream (buffer timeout %d ms) at %.0f/s: achieved %.0f/s, p50 %.1f ms, p99 %.1f ms,"
                        + " p999 %.1f ms, %d records counted exactly%s%n", bufferTimeout, rate, p.achieved, p.p50,
                p.p99, p.p999, emitted, p.sustained() ? "" : "  (not sustained)");
        return p;
    }

    void stream(int maps, int partitions, int slots) throws Exception {
        long bufferTimeout = cli.num("buffer-timeout-ms", 100);
        double warmup = cli.real("warmup-seconds", 5);
        double seconds = cli.real("seconds", 30);
        double probeWarmup = cli.real("probe-warmup-seconds", Math.min(warmup, 2));
        double probeSeconds = cli.real("probe-seconds", Math.min(seconds, 5));
        double start = cli.real("start-rate", 100_000);
        long t0 = System.nanoTime();
        List<Object> probes = new ArrayList<>();
        Double maxRate = null;
        // One unmeasured probe first warms the JVM (JIT) and the MiniCluster, as the batch workloads' warm-up run.
        boolean warmupProbe = Boolean.parseBoolean(cli.str("warmup-probe", "true"));
        if (warmupProbe) {
            System.err.println("flink stream: unmeasured warm-up probe");
            streamAt(start, maps, partitions, bufferTimeout, probeWarmup, probeSeconds);
        }
        Probe measured;
        if (cli.has("rate")) {
            measured = streamAt(cli.real("rate", 0), maps, partitions, bufferTimeout, warmup, seconds);
            probes.add(measured.json());
            if (measured.sustained()) maxRate = measured.rate;
        } else {
            // Doubling from 100,000 records/s until a probe is not sustained, then 3 bisection steps (as ours).
            Double good = null, bad = null;
            for (double rate = start; bad == null && rate <= 64e6; rate *= 2) {
                Probe p = streamAt(rate, maps, partitions, bufferTimeout, probeWarmup, probeSeconds);
                probes.add(p.json());
                if (p.sustained()) good = rate;
                else bad = rate;
            }
            for (int step = 0; step < 3 && good != null && bad != null; step++) {
                double mid = (good + bad) / 2;
                Probe p = streamAt(mid, maps, partitions, bufferTimeout, probeWarmup, probeSeconds);
                probes.add(p.json());
                if (p.sustained()) good = mid;
                else bad = mid;
            }
            maxRate = good;
            if (good == null) {
                System.err.printf("flink stream: not even %.0f records/s kept p99 under 100 ms%n", start);
                measured = null;
            } else {
                measured = streamAt(good / 2, maps, partitions, bufferTimeout, warmup, seconds);
                probes.add(measured.json());
            }
        }
        double elapsed = (System.nanoTime() - t0) / 1e9;
        Report r = new Report()
                .put("system", "flink")
                .put("version", org.apache.flink.runtime.util.EnvironmentInformation.getVersion())
                .put("workload", "stream")
                .put("mode", bufferTimeout == 100 ? "streaming" : "streaming-" + bufferTimeout + "ms")
                .put("records", measured == null ? 0 : measured.records)
                .put("maps", maps)
                .put("partitions", partitions)
                .put("keys", cli.num("keys", 100_000))
                .put("seed", cli.num("seed", 42))
                .put("seconds", Report.list(Report.round(elapsed)))
                .put("median_seconds", Report.round(elapsed))
                .put("max_rate", maxRate)
                .put("rate", measured == null ? null : measured.rate)
                .put("achieved_rate", measured == null ? null : Math.round(measured.achieved))
                .put("p50_ms", measured == null ? null : Report.round(measured.p50))
                .put("p99_ms", measured == null ? null : Report.round(measured.p99))
                .put("p999_ms", measured == null ? null : Report.round(measured.p999))
                .put("warmup_seconds", warmup)
                .put("measure_seconds", seconds)
                .put("probe_warmup_seconds", probeWarmup)
                .put("probe_seconds", probeSeconds)
                .put("warmup_probe", warmupProbe)
                .put("buffer_timeout_ms", bufferTimeout)
                .put("verified", true)
                .put("slots", slots)
                .put("probes", probes)
                .put("label", cli.str("label", ""));
        r.emit(cli.str("out", null));
    }
}
