#!/usr/bin/env python3
"""Cross-checks the Java generators (peers.common.SelfTest) against an
independent Python implementation of shared/WORKLOADS.md: splitmix64, the W1
record, xxhash64 (W1 partition), the W3 range partition, W2 keys, map ranges.

Usage: check_generators.py CLASSPATH [N]   (exits non-zero on any mismatch)
"""
import subprocess
import sys

M64 = (1 << 64) - 1


def splitmix64(x):
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


P1, P2, P3, P4, P5 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                      0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5)


def rotl(x, r):
    return ((x << r) | (x >> (64 - r))) & M64


def xxh64(data, seed=0):
    """Reference XXH64, straight from the specification."""
    n, p = len(data), 0

    def rnd(acc, lane):
        acc = (acc + lane * P2) & M64
        return (rotl(acc, 31) * P1) & M64

    if n >= 32:
        v = [(seed + P1 + P2) & M64, (seed + P2) & M64, seed, (seed - P1) & M64]
        while p <= n - 32:
            for j in range(4):
                v[j] = rnd(v[j], int.from_bytes(data[p + 8 * j:p + 8 * j + 8], "little"))
            p += 32
        h = (rotl(v[0], 1) + rotl(v[1], 7) + rotl(v[2], 12) + rotl(v[3], 18)) & M64
        for j in range(4):
            h ^= rnd(0, v[j])
            h = (h * P1 + P4) & M64
    else:
        h = (seed + P5) & M64
    h = (h + n) & M64
    while p + 8 <= n:
        h ^= rnd(0, int.from_bytes(data[p:p + 8], "little"))
        h = (rotl(h, 27) * P1 + P4) & M64
        p += 8
    if p + 4 <= n:
        h ^= (int.from_bytes(data[p:p + 4], "little") * P1) & M64
        h = (rotl(h, 23) * P2 + P3) & M64
        p += 4
    while p < n:
        h ^= (data[p] * P5) & M64
        h = (rotl(h, 11) * P1) & M64
        p += 1
    h ^= h >> 33
    h = (h * P2) & M64
    h ^= h >> 29
    h = (h * P3) & M64
    h ^= h >> 32
    return h


def w1_record(seed, i):
    h = splitmix64(seed ^ i)
    key = h.to_bytes(8, "big") + (splitmix64(h) & 0xFFFF).to_bytes(2, "big")
    value = "".join("%016x" % splitmix64((h + w + 1) & M64) for w in range(6))[:90]
    return key, value


def expected_lines(n, seed=42, keys=1000, r=16):
    out = ["splitmix64(0) %016x" % splitmix64(0),
           "splitmix64(0x9e3779b97f4a7c15) %016x" % splitmix64(0x9E3779B97F4A7C15)]
    s = 0
    for i in range(n):
        s = (s + splitmix64(seed ^ i)) & M64
    out.append("w1_key_sum %d %016x" % (n, s))
    w2keys = [splitmix64(seed ^ i) % keys for i in range(n)]
    out.append("w2_distinct %d %d %d" % (n, keys, len(set(w2keys))))
    out.append("w2_value_sum %d %d" % (n, n * (n - 1) // 2))
    pd = rd = 0
    for i in range(n):
        k, _ = w1_record(seed, i)
        pd = (pd * 31 + xxh64(k) % r) & M64
        rd = (rd * 31 + ((int.from_bytes(k[:8], "big") * r) >> 64)) & M64
    out.append("w1_partition_digest %d %d %016x" % (n, r, pd))
    out.append("w3_partition_digest %d %d %016x" % (n, r, rd))
    kd = 0
    for k in w2keys:
        kd = (kd * 31 + k) & M64
    out.append("w2_key_digest %d %d %016x" % (n, keys, kd))
    for i in (0, 1, 7, n - 1):
        k, v = w1_record(seed, i)
        out.append("w1_record %d %s %s" % (i, k.hex(), v))
    for m in range(4):
        out.append("map_range %d 4 %d %d %d" % (n, m, m * n // 4, (m + 1) * n // 4))
    out.append("xxh64_empty %016x" % xxh64(b""))
    data = bytes((i * 7 + 1) & 0xFF for i in range(40))
    for ln in (1, 3, 4, 9, 10, 31, 32, 40):
        out.append("xxh64_bytes %d %016x" % (ln, xxh64(data[:ln])))
    return out


def main():
    cp = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
    java = subprocess.run(["java", "-cp", cp, "peers.common.SelfTest", "--records", str(n)],
                          check=True, capture_output=True, text=True).stdout.splitlines()
    want = expected_lines(n)
    # Reference values independent of both implementations.
    assert splitmix64(0) == 0xE220A8397B1DCDAF and splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4
    assert xxh64(b"") == 0xEF46DB3751D8E999
    bad = [(j, w) for j, w in zip(java, want) if j != w]
    if len(java) != len(want) or bad:
        for j, w in bad:
            print("MISMATCH java: %s\n       python: %s" % (j, w))
        sys.exit(1)
    print("generators agree (Java vs Python, N=%d): %d checks" % (n, len(want)))


if __name__ == "__main__":
    main()
