package peers.common;

import java.io.FileWriter;
import java.io.IOException;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/** One JSON object per (system, workload, mode), appended as a line to --out (and printed to stdout). */
public final class Report {
    public final Map<String, Object> fields = new LinkedHashMap<>();

    public Report put(String k, Object v) {
        fields.put(k, v);
        return this;
    }

    public static double median(List<Double> xs) {
        double[] s = xs.stream().mapToDouble(Double::doubleValue).sorted().toArray();
        int n = s.length;
        return n % 2 == 1 ? s[n / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
    }

    /** Adds seconds, median_seconds, min_seconds, max_seconds of the measured runs. */
    public Report times(String prefix, List<Double> seconds) {
        List<Double> rounded = new ArrayList<>();
        for (double s : seconds) rounded.add(round(s));
        put(prefix + "seconds", rounded);
        put("median_" + prefix + "seconds", round(median(seconds)));
        put("min_" + prefix + "seconds", round(seconds.stream().mapToDouble(x -> x).min().orElse(0)));
        put("max_" + prefix + "seconds", round(seconds.stream().mapToDouble(x -> x).max().orElse(0)));
        return this;
    }

    public static double round(double x) {
        return Math.round(x * 10000.0) / 10000.0;
    }

    public String json() {
        StringBuilder b = new StringBuilder();
        write(b, fields);
        return b.toString();
    }

    @SuppressWarnings("unchecked")
    private static void write(StringBuilder b, Object v) {
        if (v == null) {
            b.append("null");
        } else if (v instanceof Map) {
            b.append('{');
            boolean first = true;
            for (Map.Entry<String, Object> e : ((Map<String, Object>) v).entrySet()) {
                if (!first) b.append(", ");
                first = false;
                write(b, e.getKey());
                b.append(": ");
                write(b, e.getValue());
            }
            b.append('}');
        } else if (v instanceof List) {
            b.append('[');
            boolean first = true;
            for (Object x : (List<Object>) v) {
                if (!first) b.append(", ");
                first = false;
                write(b, x);
            }
            b.append(']');
        } else if (v instanceof Double || v instanceof Float) {
            double d = ((Number) v).doubleValue();
            if (Double.isFinite(d)) {
                b.append(d == Math.rint(d) && Math.abs(d) < 1e15 ? Long.toString((long) d) : Double.toString(d));
            } else {
                b.append("null");
            }
        } else if (v instanceof Number || v instanceof Boolean) {
            b.append(v);
        } else {
            String s = v.toString();
            b.append('"');
            for (char c : s.toCharArray()) {
                if (c == '"' || c == '\\') b.append('\\').append(c);
                else if (c == '\n') b.append("\\n");
                else if (c < 0x20) b.append(String.format("\\u%04x", (int) c));
                else b.append(c);
            }
            b.append('"');
        }
    }

    /** Prints the line and appends it to the file named by --out, if any. */
    public void emit(String out) throws IOException {
        String line = json();
        System.out.println(line);
        if (out != null && !out.isEmpty()) {
            try (FileWriter w = new FileWriter(out, true)) {
                w.write(line);
                w.write('\n');
            }
        }
    }

    public static List<Object> list(Object... xs) {
        return new ArrayList<>(Arrays.asList(xs));
    }

    /** Fails the run loudly: no figure is printed for a run that did not verify. */
    public static void fail(String what) {
        System.err.println("VERIFICATION FAILED: " + what);
        System.err.flush();
        System.exit(2);
    }

    public static void check(boolean ok, String what) {
        if (!ok) fail(what);
    }
}
