#!/usr/bin/env python3
"""Prints the peer results (JSON lines) as Markdown tables.

Usage: table.py FILE [SKIP_LINES]   (SKIP_LINES: lines of FILE from earlier runs)
"""
import json
import sys


def fmt(x, digits=2):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def main():
    path = sys.argv[1]
    skip = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    with open(path) as f:
        rows = [json.loads(line) for line in f.readlines()[skip:] if line.strip()]
    batch = [r for r in rows if r.get("workload") != "stream"]
    stream = [r for r in rows if r.get("workload") == "stream"]
    if batch:
        print("| system | workload | mode | N | M | R | K | median s | min s | max s | MB/s | job median s | verified |")
        print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for r in batch:
            print("| " + " | ".join([
                r["system"], r["workload"], r["mode"], fmt(r.get("records")), fmt(r.get("maps")),
                fmt(r.get("partitions")), fmt(r.get("keys")), fmt(r.get("median_seconds")),
                fmt(r.get("min_seconds")), fmt(r.get("max_seconds")), fmt(r.get("mb_per_s"), 1),
                fmt(r.get("median_job_seconds")), "yes" if r.get("verified") else "NO",
            ]) + " |")
    if stream:
        print()
        print("| system | workload | mode | M | R | K | max rate/s (p99 < 100 ms) | rate/s | p50 ms | p99 ms | p999 ms"
              " | probe s (warm-up) | measured s (warm-up) | verified |")
        print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for r in stream:
            print("| " + " | ".join([
                r["system"], r["workload"], r["mode"], fmt(r.get("maps")), fmt(r.get("partitions")),
                fmt(r.get("keys")), fmt(r.get("max_rate"), 0), fmt(r.get("rate"), 0), fmt(r.get("p50_ms")),
                fmt(r.get("p99_ms")), fmt(r.get("p999_ms")),
                f"{fmt(r.get('probe_seconds'), 0)} ({fmt(r.get('probe_warmup_seconds'), 0)})",
                f"{fmt(r.get('measure_seconds'), 0)} ({fmt(r.get('warmup_seconds'), 0)})",
                "yes" if r.get("verified") else "NO",
            ]) + " |")


if __name__ == "__main__":
    main()
