#!/usr/bin/env python3
"""The throughput table of bench/run.sh from its runs.tsv: medians over the rounds, each
candidate's requests/s as a ratio to nginx, HAProxy and the bare hyper proxy (floor), CPU
per request, latency; then the issue 16 targets, each with its figure.

    throughput.py runs.tsv
"""
import csv
import statistics
import sys

runs = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
med = {}
for c in dict.fromkeys(r["candidate"] for r in runs):
    rs = [r for r in runs if r["candidate"] == c]
    m = lambda k: statistics.median(float(r[k]) for r in rs)
    med[c] = dict(rps=m("rps"), p50=m("p50_ms"), p99=m("p99_ms"), cpu=m("cpu_pct"),
                  user=m("user_us"), sys=m("sys_us"),
                  err=sum(int(r["errors"]) for r in rs), all=", ".join(r["rps"] for r in rs))


def ratio(c, base):
    if c not in med or base not in med or med[base]["rps"] == 0:
        return "-"
    return f"{med[c]['rps'] / med[base]['rps']:.2f}"


print("| candidate | req/s | × nginx | × HAProxy | × floor | user µs/req | system µs/req "
      "| p50 ms | p99 ms | CPU % | errors | req/s per round |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
for c, v in med.items():
    print(f"| {c} | {v['rps']:.0f} | {ratio(c, 'nginx')} | {ratio(c, 'haproxy')} | {ratio(c, 'floor')} "
          f"| {v['user']:.2f} | {v['sys']:.2f} | {v['p50']:.3f} | {v['p99']:.3f} | {v['cpu']:.0f} "
          f"| {v['err']} | {v['all']} |")
print()
print("One-worker candidates run alone on CPU 0; nginx-auto and s2s-default (one worker per "
      "core) are unpinned. CPU per request is the candidate's processes' own user and system "
      "time over the round divided by wrk's request count.")
print()


def line(text):
    print(f"- {text}")


if "s2s-1w" in med and "floor" in med:
    s, f = med["s2s-1w"], med["floor"]
    line(f"s2s-1w / floor: req/s **{s['rps'] / f['rps']:.2f}**, user CPU per request "
         f"**{s['user'] / max(f['user'], 0.01):.2f}** (target: within 5 %, i.e. ≥ 0.95 and ≤ 1.05)")
for base in ("nginx", "haproxy"):
    if "s2s-1w" in med and base in med:
        line(f"s2s-1w / {base} req/s: **{ratio('s2s-1w', base)}** (target ≥ 1.0)")
    if "floor" in med and base in med:
        line(f"floor / {base} req/s: {ratio('floor', base)}")
if "s2s-1w" in med and "nginx" in med:
    line(f"s2s-1w p99 {med['s2s-1w']['p99']:.3f} ms vs nginx {med['nginx']['p99']:.3f} ms "
         "(target: no worse)")
if "s2s-default" in med:
    if "s2s-1w" in med:
        line(f"s2s-default / s2s-1w req/s: **{ratio('s2s-default', 's2s-1w')}** (target ≥ 1.0)")
    if "nginx-auto" in med:
        line(f"s2s-default / nginx-auto req/s: **{ratio('s2s-default', 'nginx-auto')}** "
             "(target ≥ 1.0)")
if "s2s-alt" in med and "s2s-1w" in med:
    line(f"s2s-1w / s2s-alt req/s: {ratio('s2s-1w', 's2s-alt')}; user CPU per request "
         f"{med['s2s-1w']['user']:.2f} vs {med['s2s-alt']['user']:.2f} µs")
if "s2s-fleet" in med and "s2s-1w" in med:
    line(f"fleet mode adds **{med['s2s-fleet']['p50'] - med['s2s-1w']['p50']:.3f} ms** at p50 "
         "(s2s-fleet vs s2s-1w; target < 0.3 ms)")
