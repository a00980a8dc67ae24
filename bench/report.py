#!/usr/bin/env python3
"""Turns bench/compare.sh's JSON runs into ratio tables (median of the repeats)."""
import glob
import json
import os
import statistics
import sys

runs_dir, fresh_cost, idle_sessions, think = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
runs = {}
for path in glob.glob(os.path.join(runs_dir, "*.json")):
    workload, target, _rep = os.path.basename(path)[:-5].split("-")
    with open(path) as f:
        runs.setdefault((workload, target), []).append(json.load(f))


def med(workload, target, key, sub=None):
    vals = []
    for r in runs.get((workload, target), []):
        v = r.get(key)
        if sub is not None and isinstance(v, dict):
            v = v.get(sub)
        if isinstance(v, (int, float)):
            vals.append(v)
    return statistics.median(vals) if vals else None


def errors(workload, target):
    return sum(r.get("errors", 0) for r in runs.get((workload, target), []))


def fmt(v, digits=1):
    return "-" if v is None else f"{v:,.{digits}f}"


def ratio(a, b, digits=2):
    return "-" if a is None or b in (None, 0) else f"{a / b:.{digits}f}x"


out = []
p = out.append
p("## Benchmark results\n")
p("One run of `bench/compare.sh` on this machine (2 cores); every target is measured with the same")
p("load generator (`wsgate loadgen`) against the same mock upstream, back to back. Medians of the repeats.\n")

p("### (a) Streaming throughput: 1 session, one turn of many small deltas\n")
p("| target | events/s | vs direct | vs nginx | errors |")
p("|---|---:|---:|---:|---:|")
direct_a = med("a", "direct", "events_per_s")
nginx_a = med("a", "nginx", "events_per_s")
for t in ["direct", "nginx", "haproxy", "wsgate"]:
    v = med("a", t, "events_per_s")
    p(f"| {t} | {fmt(v, 0)} | {ratio(v, direct_a)} | {ratio(v, nginx_a)} | {errors('a', t)} |")

p(f"\n### (b) Latency: 64 sessions x 200 turns, 5 deltas per turn, {think} think time between turns\n")
p("(The think time keeps the 2-core box below saturation, so the numbers show what a hop adds,")
p("not queueing behind the load generator.)\n")
p("| target | event latency p50 / p99 / p999 (us) | added p50 vs direct (us) | added p50 vs nginx's added | first event p50 (ms) | turns/s | errors |")
p("|---|---|---:|---:|---:|---:|---:|")
d50 = med("b", "direct", "event_latency_us", "p50")
n50 = med("b", "nginx", "event_latency_us", "p50")
nginx_added = None if n50 is None or d50 is None else n50 - d50
for t in ["direct", "nginx", "haproxy", "wsgate"]:
    p50 = med("b", t, "event_latency_us", "p50")
    p99 = med("b", t, "event_latency_us", "p99")
    p999 = med("b", t, "event_latency_us", "p999")
    added = None if p50 is None or d50 is None else p50 - d50
    if t in ("direct", "nginx"):
        vs = "-"
    elif nginx_added is None or nginx_added < 10:
        vs = "n/a (nginx adds < 10 us)"
    else:
        vs = ratio(added, nginx_added)
    p(f"| {t} | {fmt(p50, 0)} / {fmt(p99, 0)} / {fmt(p999, 0)} | {fmt(added, 0)} | {vs} | "
      f"{fmt(med('b', t, 'ttfe_ms', 'p50'), 3)} | {fmt(med('b', t, 'turns_per_s'), 0)} | {errors('b', t)} |")

p(f"\n### (c) Reconnect every turn: 64 conversations x 20 turns, fresh upstream connection costs {fresh_cost}\n")
p("| target | total time (s) | turns/s | upstream connections opened | speedup vs wsgate without pooling | errors |")
p("|---|---:|---:|---:|---:|---:|")
nopool_c = med("c", "nopool", "elapsed_s")
for t in ["direct", "nginx", "haproxy", "nopool", "wsgate"]:
    el = med("c", t, "elapsed_s")
    opened = med("c", t, "upstream_connections_opened")
    p(f"| {t} | {fmt(el, 3)} | {fmt(med('c', t, 'turns_per_s'), 0)} | {fmt(opened, 0)} | "
      f"{ratio(nopool_c, el) if t != 'nopool' else '1.00x'} | {errors('c', t)} |")

p(f"\n### (d) Idle sessions: {idle_sessions} sessions held open (client + upstream socket each)\n")
p("| target | sessions ok | errors | RSS before / held (MiB) | RSS per session (KiB) |")
p("|---|---:|---:|---|---:|")
for t in ["nginx", "haproxy", "wsgate"]:
    rs = runs.get(("d", t), [])
    if not rs:
        continue
    r = rs[0]
    before, held = r.get("rss_before_kib"), r.get("rss_held_kib")
    mib = lambda k: "-" if k is None else f"{k / 1024:.1f}"
    p(f"| {t} | {r.get('turns_ok')} | {r.get('errors')} | {mib(before)} / {mib(held)} | {fmt(r.get('rss_per_session_kib'), 1)} |")

p("\n### (e) HTTP ingress: the same workloads as (a) and (b) through wsgate, WebSocket vs POST + SSE\n")
p("| ingress | (a) events/s | (b) event latency p50 / p99 (us) | (b) added p50 vs direct (us) | (b) first event p50 (ms) | (b) turns/s | errors |")
p("|---|---:|---|---:|---:|---:|---:|")
for label, wa_, wb_ in [("WebSocket", "a", "b"), ("HTTP (SSE)", "ea", "eb")]:
    p50 = med(wb_, "wsgate", "event_latency_us", "p50")
    p99 = med(wb_, "wsgate", "event_latency_us", "p99")
    added = None if p50 is None or d50 is None else p50 - d50
    p(f"| {label} | {fmt(med(wa_, 'wsgate', 'events_per_s'), 0)} | {fmt(p50, 0)} / {fmt(p99, 0)} | {fmt(added, 0)} | "
      f"{fmt(med(wb_, 'wsgate', 'ttfe_ms', 'p50'), 3)} | {fmt(med(wb_, 'wsgate', 'turns_per_s'), 0)} | {errors(wa_, 'wsgate') + errors(wb_, 'wsgate')} |")

p("\n### Targets\n")
w_added = None
w50 = med("b", "wsgate", "event_latency_us", "p50")
if w50 is not None and d50 is not None:
    w_added = w50 - d50
checks = []
if w_added is not None and nginx_added is not None:
    ok = w_added <= 1.3 * max(nginx_added, 0)
    checks.append(("per-event added latency p50 within 1.3x of nginx's", f"wsgate adds {w_added:.0f} us, nginx {nginx_added:.0f} us (vs direct)", ok))
wa = med("a", "wsgate", "events_per_s")
if wa is not None and nginx_a is not None:
    checks.append(("throughput at least nginx's", f"{wa:,.0f} vs {nginx_a:,.0f} events/s", wa >= nginx_a))
rd = runs.get(("d", "wsgate"), [{}])[0]
per = rd.get("rss_per_session_kib")
if per is not None:
    checks.append(("<= 48 KiB RSS per idle session pair", f"{per:.1f} KiB", per <= 48))
    checks.append((f"{idle_sessions} idle sessions without errors", f"{rd.get('turns_ok')} ok, {rd.get('errors')} errors", rd.get("errors") == 0))
wc = med("c", "wsgate", "elapsed_s")
if wc is not None and nopool_c is not None:
    checks.append(("reconnect workload >= 5x faster than without pooling", f"{nopool_c / wc:.1f}x", nopool_c / wc >= 5))
p("| target | measured | met |")
p("|---|---|---|")
for name, measured, ok in checks:
    p(f"| {name} | {measured} | {'yes' if ok else 'NO'} |")
print("\n".join(out))
