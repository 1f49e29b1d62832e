package peers.common;

/**
 * A log-bucketed histogram of non-negative values (microseconds here): values
 * below 128 are exact, larger ones fall into buckets 1/128 of their power of
 * two wide (under 0.8 % relative error). HdrHistogram is not on the classpath.
 */
public final class LogHistogram {
    private static final int SUB = 128;
    private final long[] counts = new long[(64 - 6) * SUB];
    private long total;

    private static int index(long v) {
        if (v < SUB) return (int) Math.max(v, 0);
        int e = 63 - Long.numberOfLeadingZeros(v); // >= 7
        int sub = (int) ((v >>> (e - 7)) & (SUB - 1));
        return (e - 6) * SUB + sub;
    }

    /** The highest value that falls into bucket i (as HdrHistogram's highestEquivalentValue). */
    private static long highest(int i) {
        if (i < SUB) return i;
        int e = i / SUB + 6;
        long sub = i % SUB;
        long low = (SUB + sub) << (e - 7);
        return low + (1L << (e - 7)) - 1;
    }

    public void record(long v) {
        counts[index(v)]++;
        total++;
    }

    public synchronized void merge(LogHistogram o) {
        for (int i = 0; i < counts.length; i++) counts[i] += o.counts[i];
        total += o.total;
    }

    public long count() {
        return total;
    }

    /** The value at quantile q in [0, 1]: the highest value of the bucket holding the ceil(q*total)-th sample. */
    public long valueAt(double q) {
        if (total == 0) return 0;
        long rank = Math.max(1, (long) Math.ceil(q * total));
        long seen = 0;
        for (int i = 0; i < counts.length; i++) {
            seen += counts[i];
            if (seen >= rank) return highest(i);
        }
        return highest(counts.length - 1);
    }
}
