package peers.flink;

import java.io.DataInputStream;
import java.io.DataOutputStream;
import java.io.IOException;
import java.io.Serializable;
import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.CompletableFuture;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.api.connector.source.Boundedness;
import org.apache.flink.api.connector.source.ReaderOutput;
import org.apache.flink.api.connector.source.Source;
import org.apache.flink.api.connector.source.SourceReader;
import org.apache.flink.api.connector.source.SourceReaderContext;
import org.apache.flink.api.connector.source.SourceSplit;
import org.apache.flink.api.connector.source.SplitEnumerator;
import org.apache.flink.api.connector.source.SplitEnumeratorContext;
import org.apache.flink.api.java.typeutils.ResultTypeQueryable;
import org.apache.flink.core.io.InputStatus;
import org.apache.flink.core.io.SimpleVersionedSerializer;
import peers.common.Gen;
import peers.common.Window;

/**
 * A bounded source of M map tasks: subtask m (run with parallelism M) is
 * assigned exactly one split, the index range [m*N/M, (m+1)*N/M), and emits
 * {@code make(i)} for every i of it. Stamps {@link Window#mapStarted()} when
 * it starts producing.
 */
public final class MapTaskSource<T> implements Source<T, MapTaskSource.Split, Void>, ResultTypeQueryable<T> {

    /** Record i of the workload. */
    public interface RecordFn<T> extends Serializable {
        T make(long i);
    }

    private final long records;
    private final int maps;
    private final RecordFn<T> fn;
    private final TypeInformation<T> type;

    public MapTaskSource(long records, int maps, RecordFn<T> fn, TypeInformation<T> type) {
        this.records = records;
        this.maps = maps;
        this.fn = fn;
        this.type = type;
    }

    @Override
    public TypeInformation<T> getProducedType() {
        return type;
    }

    @Override
    public Boundedness getBoundedness() {
        return Boundedness.BOUNDED;
    }

    @Override
    public SourceReader<T, Split> createReader(SourceReaderContext ctx) {
        return new Reader<>(fn);
    }

    @Override
    public SplitEnumerator<Split, Void> createEnumerator(SplitEnumeratorContext<Split> ctx) {
        return new Enumerator(ctx, records, maps);
    }

    @Override
    public SplitEnumerator<Split, Void> restoreEnumerator(SplitEnumeratorContext<Split> ctx, Void checkpoint) {
        return new Enumerator(ctx, records, maps);
    }

    @Override
    public SimpleVersionedSerializer<Split> getSplitSerializer() {
        return new SplitSerializer();
    }

    @Override
    public SimpleVersionedSerializer<Void> getEnumeratorCheckpointSerializer() {
        return new SimpleVersionedSerializer<>() {
            @Override
            public int getVersion() {
                return 1;
            }

            @Override
            public byte[] serialize(Void v) {
                return new byte[0];
            }

            @Override
            public Void deserialize(int version, byte[] b) {
                return null;
            }
        };
    }

    /** Map task m's index range (next index, end). */
    public static final class Split implements SourceSplit {
        final int map;
        final long next;
        final long end;

        Split(int map, long next, long end) {
            this.map = map;
            this.next = next;
            this.end = end;
        }

        @Override
        public String splitId() {
            return Integer.toString(map);
        }
    }

    static final class SplitSerializer implements SimpleVersionedSerializer<Split> {
        @Override
        public int getVersion() {
            return 1;
        }

        @Override
        public byte[] serialize(Split s) throws IOException {
            java.io.ByteArrayOutputStream bytes = new java.io.ByteArrayOutputStream();
            try (DataOutputStream out = new DataOutputStream(bytes)) {
                out.writeInt(s.map);
                out.writeLong(s.next);
                out.writeLong(s.end);
            }
            return bytes.toByteArray();
        }

        @Override
        public Split deserialize(int version, byte[] b) throws IOException {
            try (DataInputStream in = new DataInputStream(new java.io.ByteArrayInputStream(b))) {
                return new Split(in.readInt(), in.readLong(), in.readLong());
            }
        }
    }

    /** Assigns split m to subtask m as soon as that reader registers; nothing else. */
    static final class Enumerator implements SplitEnumerator<Split, Void> {
        private final SplitEnumeratorContext<Split> ctx;
        private final long records;
        private final int maps;

        Enumerator(SplitEnumeratorContext<Split> ctx, long records, int maps) {
            this.ctx = ctx;
            this.records = records;
            this.maps = maps;
        }

        @Override
        public void start() {
            if (ctx.currentParallelism() != maps) {
                throw new IllegalStateException("the source must run with parallelism M = " + maps);
            }
        }

        @Override
        public void handleSplitRequest(int subtask, String host) {}

        @Override
        public void addSplitsBack(List<Split> splits, int subtask) {
            for (Split s : splits) ctx.assignSplit(s, subtask);
        }

        @Override
        public void addReader(int subtask) {
            ctx.assignSplit(new Split(subtask, Gen.mapStart(records, maps, subtask), Gen.mapEnd(records, maps, subtask)),
                    subtask);
            ctx.signalNoMoreSplits(subtask);
        }

        @Override
        public Void snapshotState(long checkpointId) {
            return null;
        }

        @Override
        public void close() {}
    }

    static final class Reader<T> implements SourceReader<T, Split> {
        private static final int BATCH = 4096;
        private final RecordFn<T> fn;
        private final ArrayDeque<Split> splits = new ArrayDeque<>();
        private boolean noMoreSplits;
        private CompletableFuture<Void> available = new CompletableFuture<>();
        private int map = -1;
        private long next, end;
        private boolean started;

        Reader(RecordFn<T> fn) {
            this.fn = fn;
        }

        @Override
        public void start() {}

        @Override
        public InputStatus pollNext(ReaderOutput<T> out) {
            if (map < 0) {
                Split s = splits.poll();
                if (s == null) {
                    if (noMoreSplits) return InputStatus.END_OF_INPUT;
                    available = new CompletableFuture<>();
                    return InputStatus.NOTHING_AVAILABLE;
                }
                map = s.map;
                next = s.next;
                end = s.end;
                if (!started) {
                    started = true;
                    Window.mapStarted();
                }
            }
            long stop = Math.min(end, next + BATCH);
            for (long i = next; i < stop; i++) out.collect(fn.make(i));
            next = stop;
            if (next >= end) map = -1;
            return InputStatus.MORE_AVAILABLE;
        }

        @Override
        public List<Split> snapshotState(long checkpointId) {
            List<Split> state = new ArrayList<>(splits);
            if (map >= 0) state.add(new Split(map, next, end));
            return state;
        }

        @Override
        public CompletableFuture<Void> isAvailable() {
            return available;
        }

        @Override
        public void addSplits(List<Split> newSplits) {
            splits.addAll(newSplits);
            available.complete(null);
        }

        @Override
        public void notifyNoMoreSplits() {
            noMoreSplits = true;
            available.complete(null);
        }

        @Override
        public void close() {}
    }
}
