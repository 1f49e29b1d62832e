package peers.common;

import java.util.HashMap;
import java.util.Map;

/** `--name value` flags; every workload parameter is one. */
public final class Cli {
    private final Map<String, String> flags = new HashMap<>();

    public Cli(String[] args) {
        for (int i = 0; i < args.length; i++) {
            String a = args[i];
            if (!a.startsWith("--")) throw new IllegalArgumentException("unexpected argument " + a);
            String name = a.substring(2);
            int eq = name.indexOf('=');
            if (eq >= 0) {
                flags.put(name.substring(0, eq), name.substring(eq + 1));
            } else if (i + 1 < args.length && !args[i + 1].startsWith("--")) {
                flags.put(name, args[++i]);
            } else {
                flags.put(name, "true");
            }
        }
    }

    public String str(String name, String dflt) {
        return flags.getOrDefault(name, dflt);
    }

    public long num(String name, long dflt) {
        String v = flags.get(name);
        return v == null ? dflt : Long.parseLong(v.replace("_", "").replace(",", ""));
    }

    public int integer(String name, int dflt) {
        return Math.toIntExact(num(name, dflt));
    }

    public double real(String name, double dflt) {
        String v = flags.get(name);
        return v == null ? dflt : Double.parseDouble(v.replace("_", ""));
    }

    public boolean has(String name) {
        return flags.containsKey(name);
    }
}
