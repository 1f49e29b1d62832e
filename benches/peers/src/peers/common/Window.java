package peers.common;

import java.util.concurrent.atomic.AtomicLong;

/**
 * The measured window of one run: from the first map task starting to the
 * last reduce task finishing. Both engines run their tasks inside this JVM
 * (Spark local mode, Flink MiniCluster), so the tasks stamp these statics.
 */
public final class Window {
    private Window() {}

    private static final AtomicLong FIRST_START = new AtomicLong(Long.MAX_VALUE);
    private static final AtomicLong LAST_END = new AtomicLong(Long.MIN_VALUE);

    public static void reset() {
        FIRST_START.set(Long.MAX_VALUE);
        LAST_END.set(Long.MIN_VALUE);
    }

    /** Called by every map task when it starts. */
    public static void mapStarted() {
        long now = System.nanoTime();
        FIRST_START.accumulateAndGet(now, Math::min);
    }

    /** Called by every reduce task when it has finished its partition. */
    public static void reduceFinished() {
        long now = System.nanoTime();
        LAST_END.accumulateAndGet(now, Math::max);
    }

    /** Seconds from the first map start to the last reducer end. */
    public static double seconds() {
        long s = FIRST_START.get(), e = LAST_END.get();
        if (s == Long.MAX_VALUE || e == Long.MIN_VALUE || e < s) {
            throw new IllegalStateException("the run did not stamp its window");
        }
        return (e - s) / 1e9;
    }
}
