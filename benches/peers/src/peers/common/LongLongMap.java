package peers.common;

/** An open-addressing u64 -> i64 hash map (no boxing), for map-side combining and reducer state. */
public final class LongLongMap {
    private long[] keys;
    private long[] values;
    private boolean[] used;
    private int size;
    private int mask;

    public LongLongMap(int expected) {
        int cap = Integer.highestOneBit(Math.max(16, expected * 2 - 1)) << 1;
        keys = new long[cap];
        values = new long[cap];
        used = new boolean[cap];
        mask = cap - 1;
    }

    private static int slot(long k, int mask) {
        long h = k * 0x9E3779B97F4A7C15L;
        return (int) (h ^ (h >>> 32)) & mask;
    }

    /** map[k] += v (wrapping). */
    public void add(long k, long v) {
        int i = slot(k, mask);
        while (used[i]) {
            if (keys[i] == k) {
                values[i] += v;
                return;
            }
            i = (i + 1) & mask;
        }
        used[i] = true;
        keys[i] = k;
        values[i] = v;
        if (++size * 2 > keys.length) grow();
    }

    /** map[k] = v. */
    public void put(long k, long v) {
        int i = slot(k, mask);
        while (used[i]) {
            if (keys[i] == k) {
                values[i] = v;
                return;
            }
            i = (i + 1) & mask;
        }
        used[i] = true;
        keys[i] = k;
        values[i] = v;
        if (++size * 2 > keys.length) grow();
    }

    private void grow() {
        long[] ok = keys, ov = values;
        boolean[] ou = used;
        int cap = ok.length * 2;
        keys = new long[cap];
        values = new long[cap];
        used = new boolean[cap];
        mask = cap - 1;
        size = 0;
        for (int i = 0; i < ok.length; i++) {
            if (ou[i]) put(ok[i], ov[i]);
        }
    }

    public int size() {
        return size;
    }

    /** Wrapping sum of all values. */
    public long valueSum() {
        long s = 0;
        for (int i = 0; i < keys.length; i++) {
            if (used[i]) s += values[i];
        }
        return s;
    }

    public interface Visitor {
        void visit(long key, long value) throws Exception;
    }

    public void forEach(Visitor v) throws Exception {
        for (int i = 0; i < keys.length; i++) {
            if (used[i]) v.visit(keys[i], values[i]);
        }
    }
}
