#!/usr/bin/env python3
"""Turns bench/compare.sh's JSON runs into ratio tables (median of the repeats)."""
import glob
import json
import os
import statistics
import sys

runs_dir, fresh_cost, idle_sessions, think = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
scale = sys.argv[5] if len(sys.argv) > 5 else "scale workload"
steal_max = sys.argv[6] if len(sys.argv) > 6 else "1"
runs = {}
for path in glob.glob(os.path.join(runs_dir, "*.json")):
    workload, target, rep = os.path.basename(path)[:-5].split("-")
    with open(path) as f:
        r = json.load(f)
        r["_rep"] = rep
        runs.setdefault((workload, target), []).append(r)
# Runs during which the hypervisor took more than STEAL_MAX % of the CPU time, run again by
# compare.sh: {(workload, target, repeat): [attempt 0, attempt 1, ...]}.
disturbed = {}
for path in glob.glob(os.path.join(runs_dir, "disturbed", "*.json")):
    workload, target, rep, attempt = os.path.basename(path)[:-5].split("-")
    with open(path) as f:
        r = json.load(f)
        r["_rep"], r["_attempt"] = rep, int(attempt)
        disturbed.setdefault((workload, target, rep), []).append(r)
for attempts in disturbed.values():
    attempts.sort(key=lambda r: r["_attempt"])


def by_repeat(workload, target, key, sub=None, src=None):
    """{repeat: value} of one target's runs of a workload (the repeats' spread, beside the median)."""
    vals = {}
    for r in (runs if src is None else src).get((workload, target), []):
        v = r.get(key)
        if sub is not None and isinstance(v, dict):
            v = v.get(sub)
        if isinstance(v, (int, float)):
            vals[r["_rep"]] = v
    return vals


def med(workload, target, key, sub=None, src=None):
    vals = list(by_repeat(workload, target, key, sub, src).values())
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
p("load generator (`wsgate loadgen`) against the same mock upstream, back to back. Medians of the repeats.")
p("`tokiocopy` is the smallest tokio TCP proxy (examples/byte_proxy.rs, `copy_bidirectional`): not a")
p("WebSocket proxy, a reference for what the runtime and two sockets cost before any relay work.")
p("`pooledcopy` (in (c) only) is the least a pooled middle can do (examples/pooled_relay.rs): it answers")
p("the client's handshake itself, keeps one upstream socket per conversation and copies bytes, parsing no")
p("frame: not a gateway, the ceiling of the reconnect speed-up on this machine.\n")

p("### (a) Streaming throughput: 1 session, one turn of many small deltas\n")
p("| target | events/s | vs direct | vs nginx | errors |")
p("|---|---:|---:|---:|---:|")
direct_a = med("a", "direct", "events_per_s")
nginx_a = med("a", "nginx", "events_per_s")
for t in ["direct", "nginx", "haproxy", "tokiocopy", "wsgate"]:
    v = med("a", t, "events_per_s")
    p(f"| {t} | {fmt(v, 0)} | {ratio(v, direct_a)} | {ratio(v, nginx_a)} | {errors('a', t)} |")

def latency_table(w, targets):
    """(b)-shaped rows for workload `w`; returns (direct p50, nginx's added p50)."""
    p("| target | event latency p50 / p99 / p999 (us) | added p50 vs direct (us) | added p50 vs nginx's added | first event p50 (ms) | turns/s | errors |")
    p("|---|---|---:|---:|---:|---:|---:|")
    d50 = med(w, "direct", "event_latency_us", "p50")
    n50 = med(w, "nginx", "event_latency_us", "p50")
    nginx_added = None if n50 is None or d50 is None else n50 - d50
    for t in targets:
        p50 = med(w, t, "event_latency_us", "p50")
        p99 = med(w, t, "event_latency_us", "p99")
        p999 = med(w, t, "event_latency_us", "p999")
        added = None if p50 is None or d50 is None else p50 - d50
        if t in ("direct", "nginx"):
            vs = "-"
        elif nginx_added is None or nginx_added < 10:
            vs = "n/a (nginx adds < 10 us)"
        else:
            vs = ratio(added, nginx_added)
        p(f"| {t} | {fmt(p50, 0)} / {fmt(p99, 0)} / {fmt(p999, 0)} | {fmt(added, 0)} | {vs} | "
          f"{fmt(med(w, t, 'ttfe_ms', 'p50'), 3)} | {fmt(med(w, t, 'turns_per_s'), 0)} | {errors(w, t)} |")
    return d50, nginx_added


p(f"\n### (b) Latency: 64 sessions x 200 turns, 5 deltas per turn, {think} think time between turns\n")
p(f"(Each pause is drawn uniformly from {think} x [0.5, 1.5], by a hash of session and turn: the same")
p("schedule for every target. The think time keeps the 2-core box below saturation, so the numbers")
p("show what a hop adds, not queueing behind the load generator.)\n")
d50, nginx_added = latency_table("b", ["direct", "nginx", "haproxy", "tokiocopy", "wsgate"])
if runs.get(("bl", "wsgate")):
    p(f"\n#### (b) in lockstep: every pause exactly {think} (informative)\n")
    p("(The 64 sessions start together and tokio's timer wheel rounds each pause to the millisecond,")
    p("so with equal pauses they stay in step and their turns reach the middle process in bursts:")
    p("this measures queueing behind a burst of turns, which grows with the middle's CPU per turn.)\n")
    latency_table("bl", ["direct", "nginx", "wsgate"])

p(f"\n### (c) Reconnect every turn: 64 conversations x 20 turns, fresh upstream connection costs {fresh_cost}\n")
p("| target | total time (s) | turns/s | upstream connections opened | speedup vs wsgate without pooling "
  "| middle's CPU per turn (us) | errors |")
p("|---|---:|---:|---:|---:|---:|---:|")
nopool_c = med("c", "nopool", "elapsed_s")


def cpu_per_turn(r):
    """The middle's CPU (user + system) per turn of run `r`, in us (None without --cpu-pid)."""
    u, s = r.get("cpu_user_s_per_million_events"), r.get("cpu_system_s_per_million_events")
    if u is None or s is None or not r.get("turns_ok"):
        return None
    return (u + s) * r.get("events", 0) / r["turns_ok"]


for t in ["direct", "nginx", "haproxy", "nopool", "pooledcopy", "wsgate"]:
    el = med("c", t, "elapsed_s")
    opened = med("c", t, "upstream_connections_opened")
    cpus = [c for c in map(cpu_per_turn, runs.get(("c", t), [])) if c is not None]
    p(f"| {t} | {fmt(el, 3)} | {fmt(med('c', t, 'turns_per_s'), 0)} | {fmt(opened, 0)} | "
      f"{ratio(nopool_c, el) if t != 'nopool' else '1.00x'} | "
      f"{fmt(statistics.median(cpus), 0) if cpus else '-'} | {errors('c', t)} |")

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

p("\n### CPU cost: the middle process's CPU seconds (user + system) per million relayed events\n")
p("(From /proc utime + stime of the process and its children, before and after each run; medians.)\n")
p("| target | (a) streaming | (b) latency workload | (b) of which user / system | (f) scale |")
p("|---|---:|---:|---|---:|")
for t in ["nginx", "haproxy", "tokiocopy", "wsgate"]:
    split = f"{fmt(med('b', t, 'cpu_user_s_per_million_events'), 2)} / {fmt(med('b', t, 'cpu_system_s_per_million_events'), 2)}"
    p(f"| {t} | {fmt(med('a', t, 'cpu_s_per_million_events'), 2)} | {fmt(med('b', t, 'cpu_s_per_million_events'), 2)} | "
      f"{split} | {fmt(med('f', t, 'cpu_s_per_million_events'), 2)} |")
mock_a, mock_b = med("a", "direct", "cpu_s_per_million_events"), med("b", "direct", "cpu_s_per_million_events")
if mock_a is not None or mock_b is not None:
    p(f"| (the mock upstream, in the direct runs) | {fmt(mock_a, 2)} | {fmt(mock_b, 2)} | - | - |")
p("\n(User is the process's own code: its runtime, parsing, framing. System is the kernel's work on its")
p("behalf: socket reads and writes, loopback delivery, epoll, wake-ups. Ticks of 10 ms, so small shares are coarse.)")

p(f"\n### (f) Scale: {scale}\n")
p("| target | sessions | turns ok | errors | events/s | event latency p50 / p99 (us) | RSS before / peak (MiB) |")
p("|---|---:|---:|---:|---:|---|---|")
for t in ["nginx", "wsgate"]:
    rs = runs.get(("f", t), [])
    if not rs:
        continue
    r = rs[0]
    lat = r.get("event_latency_us") or {}
    mib = lambda k: "-" if k is None else f"{k / 1024:.1f}"
    p(f"| {t} | {r.get('sessions')} | {r.get('turns_ok')} | {r.get('errors')} | {fmt(r.get('events_per_s'), 0)} | "
      f"{fmt(lat.get('p50'), 0)} / {fmt(lat.get('p99'), 0)} | {mib(r.get('rss_before_kib'))} / {mib(r.get('rss_peak_kib'))} |")

p("\n### Targets\n")


def goal_checks(src, subject="wsgate", pooled="wsgate"):
    """The targets of (a), (b) and (c), measured from the runs `src` (name, measured, met):
    `subject`'s in (a) and (b), `pooled`'s in (c)."""
    checks = []
    wa, na = med("a", subject, "events_per_s", src=src), med("a", "nginx", "events_per_s", src=src)
    if wa is not None and na is not None:
        checks.append(("(a) throughput >= 1.0x nginx's", f"{wa:,.0f} vs {na:,.0f} events/s ({wa / na:.2f}x)", wa >= na))
    w50, n50, d50 = (med("b", t, "event_latency_us", "p50", src) for t in (subject, "nginx", "direct"))
    w99, n99 = (med("b", t, "event_latency_us", "p99", src) for t in (subject, "nginx"))
    if None not in (w50, n50, d50):
        w_added, n_added = w50 - d50, n50 - d50
        checks.append(("(b) added latency p50 <= nginx's added + 25 us",
                       f"{subject} adds {w_added:.0f} us, nginx {n_added:.0f} us (vs direct)", w_added <= n_added + 25))
    if w99 is not None and n99 is not None:
        checks.append(("(b) latency p99 <= 1.3x nginx's", f"{w99:,.0f} vs {n99:,.0f} us ({w99 / n99:.2f}x)", w99 <= 1.3 * n99))
    speedups = speedups_of(pooled, src)
    if speedups:
        checks.append(("(c) reconnect-every-turn speed-up >= 5x in every repeat",
                       ", ".join(f"{x:.2f}x" for x in speedups), speedups[0] >= 5))
    return checks


def speedups_of(t, src=None):
    """(c): wsgate without pooling's time over `t`'s, per repeat (same repeat number for both)."""
    per_rep = {}
    for name in (t, "nopool"):
        for r in (runs if src is None else src).get(("c", name), []):
            per_rep.setdefault(r["_rep"], {})[name] = r.get("elapsed_s")
    return sorted(v["nopool"] / v[t] for v in per_rep.values() if v.get(t) and v.get("nopool"))


checks = goal_checks(runs)
l50, ld50, ln50 = (med("bl", t, "event_latency_us", "p50") for t in ("wsgate", "direct", "nginx"))
l99, ln99 = (med("bl", t, "event_latency_us", "p99") for t in ("wsgate", "nginx"))
informative = []
if None not in (l50, ld50, ln50, l99, ln99):
    informative.append(f"(b) in lockstep (informative, not a target): wsgate adds {l50 - ld50:.0f} us at p50, nginx "
                       f"{ln50 - ld50:.0f} us; p99 {l99:,.0f} vs {ln99:,.0f} us ({l99 / ln99:.2f}x)")
# The repeats behind the (a) and (b) medians, paired by repeat number (the targets of one
# repeat run minutes apart at most, so a noisy stretch of the host shows in all of them).
wa_r, na_r = by_repeat("a", "wsgate", "events_per_s"), by_repeat("a", "nginx", "events_per_s")
reps = sorted(set(wa_r) & set(na_r), key=int)
if len(reps) > 1:
    informative.append("(a) per repeat (informative): wsgate vs nginx " + ", ".join(
        f"{wa_r[r] / 1e6:.2f}M vs {na_r[r] / 1e6:.2f}M ({wa_r[r] / na_r[r]:.2f}x)" for r in reps))
b_r = {t: by_repeat("b", t, "event_latency_us", "p50") for t in ("direct", "nginx", "tokiocopy", "wsgate")}
reps = sorted(set.intersection(*(set(v) for v in b_r.values())), key=int)
if reps:
    added = {t: [b_r[t][r] - b_r["direct"][r] for r in reps] for t in ("nginx", "tokiocopy", "wsgate")}
    informative.append("(b) added p50 per repeat (informative): wsgate vs nginx " + ", ".join(
        f"{w:.0f} vs {n:.0f} us" for w, n in zip(added["wsgate"], added["nginx"]))
        + "; the tokio byte proxy (`tokiocopy`) " + ", ".join(f"{x:.0f}" for x in added["tokiocopy"]) + " us")
b99_r = {t: by_repeat("b", t, "event_latency_us", "p99") for t in ("direct", "nginx", "tokiocopy", "wsgate")}
reps = sorted(set.intersection(*(set(v) for v in b99_r.values())), key=int)
if reps:
    # The p99 target compares medians of runs minutes apart; per repeat the order can flip.
    informative.append("(b) p99 per repeat (informative): wsgate vs nginx " + ", ".join(
        f"{b99_r['wsgate'][r]:,.0f} vs {b99_r['nginx'][r]:,.0f} us ({b99_r['wsgate'][r] / b99_r['nginx'][r]:.2f}x)"
        for r in reps) + "; `tokiocopy` " + ", ".join(f"{b99_r['tokiocopy'][r]:,.0f}" for r in reps)
        + " us; direct " + ", ".join(f"{b99_r['direct'][r]:,.0f}" for r in reps) + " us")
ceiling = speedups_of("pooledcopy")
if ceiling:
    informative.append("(c) ceiling on this machine (informative, not a target): `pooledcopy`, the least a pooled "
                    "middle can do, " + ", ".join(f"{x:.2f}x" for x in ceiling) + " in the same repeats")
rd = runs.get(("d", "wsgate"), [{}])[0]
per = rd.get("rss_per_session_kib")
if per is not None:
    checks.append(("(d) <= 16 KiB RSS per idle session pair", f"{per:.1f} KiB ({idle_sessions} pairs, {rd.get('errors')} errors)",
                   per <= 16 and rd.get("errors") == 0))
# How much of the machine's CPU its hypervisor took during the timed runs, and the runs that
# compare.sh ran again for it (with what they measured), and the targets as those first
# attempts measured them: the table above is of the runs kept.
TIMED = ("a", "b", "bl", "c", "ea", "eb")


def figure(w, r):
    """A run's headline figure, for the list of runs run again."""
    if r is None:
        return "-"
    if w in ("a", "ea"):
        return f"{r.get('events_per_s', 0) / 1e6:.2f}M events/s"
    if w in ("b", "bl", "eb"):
        lat = r.get("event_latency_us") or {}
        return f"p50 {lat.get('p50', 0):,.0f} / p99 {lat.get('p99', 0):,.0f} us"
    return f"{r.get('elapsed_s', 0):.2f} s"


def run_key(item):
    (w, t, rep), _ = item
    return (TIMED.index(w) if w in TIMED else len(TIMED), t, int(rep))


steals = [(r["host_steal_pct"], f"{w}/{t}/{r['_rep']}") for (w, t), rs in runs.items() if w in TIMED
          for r in rs if r.get("host_steal_pct") is not None]
if steals:
    top = max(steals)
    informative.append(f"Host steal during the timed runs kept (informative): median {statistics.median(s for s, _ in steals):.1f}%, "
                       f"max {top[0]:.1f}% ({top[1]}) of the machine's CPU time (runs above {steal_max}% are run again, "
                       "at most twice by default)")
if disturbed:
    items = []
    for (w, t, rep), attempts in sorted(disturbed.items(), key=run_key):
        kept = next((r for r in runs.get((w, t), []) if r["_rep"] == rep), None)
        tries = ", then ".join(f"{r.get('host_steal_pct', 0):.1f}% steal: {figure(w, r)}" for r in attempts)
        kept_steal = "-" if kept is None or kept.get("host_steal_pct") is None else f"{kept['host_steal_pct']:.1f}%"
        items.append(f"{w}/{t}/{rep} {tries}; kept {kept_steal} steal: {figure(w, kept)}")
    informative.append(f"Runs run again because the hypervisor took more than {steal_max}% of the CPU time during them "
                       "(informative): " + "; ".join(items))
    first = {k: [(disturbed.get((k[0], k[1], r["_rep"])) or [r])[0] for r in rs] for k, rs in runs.items()}
    informative.append("The targets as the first attempts measured them (informative): " + "; ".join(
        f"{name} {measured} ({'met' if ok else 'NO'})" for name, measured, ok in goal_checks(first)))
# The control: the same targets applied in the same run to the references that do nothing but
# move bytes (the tokio byte proxy in (a) and (b), `pooledcopy` in (c)). Where they miss a
# target too, the host did not allow it in that run, whatever the middle does.
control = {name: (measured, ok) for name, measured, ok in goal_checks(runs, "tokiocopy", "pooledcopy")}
p("| target | measured | met | the same target for a middle that only moves bytes (control) |")
p("|---|---|---|---|")
for name, measured, ok in checks:
    ref = control.get(name)
    ref_text = "-" if ref is None else f"{ref[0]}: {'met' if ref[1] else 'NO'}"
    p(f"| {name} | {measured} | {'yes' if ok else 'NO'} | {ref_text} |")
p("\n(Control: `tokiocopy` in (a) and (b), `pooledcopy` in (c); informative, not a target.)")


def turn_cpu(w, t):
    """Median CPU per turn of target `t` in workload `w`, user and total, in us (None without it)."""
    rs = runs.get((w, t), [])
    tot = [c for c in map(cpu_per_turn, rs) if c is not None]
    user = [r["cpu_user_s_per_million_events"] * r["events"] / r["turns_ok"] for r in rs
            if r.get("cpu_user_s_per_million_events") is not None and r.get("turns_ok")]
    return (statistics.median(user) if user else None, statistics.median(tot) if tot else None)


def cpu_text(w, targets):
    parts = []
    for t in targets:
        user, tot = turn_cpu(w, t)
        if tot is not None:
            parts.append(f"{t} {tot:.0f} us" + (f" (user {user:.0f})" if user is not None else ""))
    return ", ".join(parts) or "-"


def steal_text(w, t):
    rs = sorted(runs.get((w, t), []), key=lambda r: int(r["_rep"]))
    st = [r["host_steal_pct"] for r in rs if r.get("host_steal_pct") is not None]
    return "-" if not st else ", ".join(f"{x:.1f}%" for x in st)


def why_missed(name):
    """What this run's own figures say about a missed target, and the profile that explains it
    (README "Where the goals stand" has the reading over every saved run)."""
    ctl = control.get(name)
    ctl_text = "" if ctl is None else f" The control in this run: {ctl[0]} ({'met' if ctl[1] else 'missed'})."
    if name.startswith("(a)"):
        cpu = ", ".join(f"{t} {fmt(med('a', t, 'cpu_s_per_million_events'), 2)}" for t in ("wsgate", "nginx", "tokiocopy"))
        return (f"CPU seconds per million events: {cpu}; host steal in wsgate's repeats {steal_text('a', 'wsgate')}."
                f"{ctl_text} One stream keeps the mock, the middle and the load generator busy on two cores, so its "
                "speed is set by the three's CPU per event together, and a median of three repeats of a middle "
                "costing about nginx's falls on either side of 1.0x ([profile-stop40.md](profile-stop40.md)).")
    if name.startswith("(b) added"):
        return (f"CPU per (b) turn: {cpu_text('b', ('wsgate', 'nginx', 'tokiocopy'))}.{ctl_text} The gap is wsgate's "
                "own work per turn between the answer's read and its write, and after the write on the thread a "
                "reader on the same machine waits for ([profile-stop41.md](profile-stop41.md)).")
    if name.startswith("(b) latency p99"):
        return (f"Host steal in wsgate's (b) repeats {steal_text('b', 'wsgate')}, nginx's {steal_text('b', 'nginx')}; "
                f"CPU per (b) turn: {cpu_text('b', ('wsgate', 'nginx', 'tokiocopy'))}.{ctl_text} A tail is set by the "
                "host's stalls and by queueing behind other turns, which grows with the middle's CPU per turn "
                "([profile-stop39.md](profile-stop39.md), and the (b) p99 per repeat below).")
    if name.startswith("(c)"):
        return (f"CPU per reconnect turn: {cpu_text('c', ('wsgate', 'pooledcopy', 'nginx'))}.{ctl_text} A pooled "
                "repeat lasts ~0.2 s, so one stall of the host costs it 5-20%; the difference to the copier is "
                "wsgate's user time per turn ([profile-stop43.md](profile-stop43.md)).")
    return f"{ctl_text.strip()}" or "-"


missed = [(name, measured) for name, measured, ok in checks if not ok]
if missed:
    p("\n#### What explains each miss (this run's figures, and the profile behind them)\n")
    for name, measured in missed:
        p(f"- **{name}** ({measured}): {why_missed(name)}")
for line in informative:
    p(f"\n{line}")
print("\n".join(out))
