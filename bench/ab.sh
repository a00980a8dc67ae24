#!/usr/bin/env bash
# A/B of two gateway builds on workload (b) of bench/compare.sh, in one run: the same mock,
# the same load generator, the two gateways running side by side and measured in alternating
# rounds, so a noisy host hits both alike. Per round and build: event latency p50 / p99 and
# the gateway's CPU per turn, user and system (from /proc, `wsgate loadgen --cpu-pid`); then
# the medians and B's ratio to A. This is how a change to the hot path is judged before the
# full compare.sh runs (one full run's spread is wider than most single changes). The order
# flips every round (A B, B A, ...), so neither build always runs right after the other.
# CPU is counted in 10 ms ticks: the default 12,800 turns make one tick ~0.8 us per turn.
#
# Usage: bench/ab.sh BIN_A BIN_B              two wsgate binaries (B may be A: the noise floor)
#        ROUNDS=5 bench/ab.sh ...             rounds (default 5)
#        ENV_B="TOKIO_WORKER_THREADS=1" ...   environment for B only (a knob instead of a build)
#        SESSIONS=64 TURNS=200 THINK=20ms ... the workload (defaults: compare.sh's full (b))
#        DELTAS=5 ...                         deltas per turn (default 5; SESSIONS=1 TURNS=1
#                                             DELTAS=300000 THINK=0s is workload (a)'s stream)
#        HTTP=1 bench/ab.sh ...               through the HTTP ingress (POST + SSE, workload (e))
# The load generator and mock are BIN_A's.
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
ab_builds "$@"
ROUNDS=${ROUNDS:-5}; SESSIONS=${SESSIONS:-64}; TURNS=${TURNS:-200}; THINK=${THINK:-20ms}
DELTAS=${DELTAS:-5}; INGRESS=(); [ -n "${HTTP:-}" ] && INGRESS=(--http)
ENV_B=${ENV_B:-}

MOCK_PORT=$(free_port)
"$A" mock-upstream --listen "127.0.0.1:$MOCK_PORT" --speed >"$TMP/mock.log" 2>&1 &
PIDS+=($!); wait_port "$MOCK_PORT"

declare -A PORT PID
start_ab_gateways "$MOCK_PORT"

echo "A: $A"
echo "B: $B${ENV_B:+ (with $ENV_B)}"
echo "workload: $SESSIONS sessions x $TURNS turns, $DELTAS deltas, think $THINK (x[0.5, 1.5]), $ROUNDS rounds${HTTP:+, HTTP ingress (POST + SSE)}"
for r in $(seq "$ROUNDS"); do
  order="A B"; [ $((r % 2)) = 0 ] && order="B A"
  for t in $order; do
    "$A" loadgen --url "ws://127.0.0.1:${PORT[$t]}/v1/responses" --label "$t" \
      --mock-url "ws://127.0.0.1:$MOCK_PORT/v1/responses" --json "$TMP/$t-$r.json" \
      --sessions "$SESSIONS" --turns "$TURNS" --deltas "$DELTAS" --think "$THINK" --think-jitter 0.5 \
      "${INGRESS[@]}" --cpu-pid "${PID[$t]}" >"$TMP/loadgen.log" 2>&1 || { cat "$TMP/loadgen.log" >&2; exit 1; }
  done
done

python3 - "$TMP" "$ROUNDS" <<'EOF'
import json, statistics, sys
tmp, rounds = sys.argv[1], int(sys.argv[2])
def row(t, r):
    d = json.load(open(f"{tmp}/{t}-{r}.json"))
    # (CPU seconds per million events) x (events per turn) = CPU microseconds per turn
    events_per_turn = d["events"] / max(d["turns_ok"], 1)
    split = (d.get("cpu_user_s_per_million_events"), d.get("cpu_system_s_per_million_events"))
    if None in split:
        # A load generator without the split (BIN_A older than it) or no events: say so
        # rather than compare zeros.
        sys.exit(f"{t} round {r}: no user / system CPU in the report (BIN_A's load generator "
                 f"must report them; {d['events']} events, first error {d.get('first_error')})")
    user, system = (x * events_per_turn for x in split)
    lat = d["event_latency_us"]
    return dict(p50=lat["p50"], p99=lat["p99"], user=user, system=system, cpu=user + system, errors=d["errors"],
                steal=d.get("host_steal_pct"), eps=d["events_per_s"])
rows = {t: [row(t, r) for r in range(1, rounds + 1)] for t in "AB"}
print()
# Host steal: the CPU time the hypervisor gave other guests during the run (a round with
# more than ~1% measured the neighbours as much as the builds; README "Performance").
steal = lambda x: "-" if x["steal"] is None else f"{x['steal']:.1f}"
print("| round | A p50 / p99 (us) | A CPU per turn, user / system (us) | B p50 / p99 (us) | B CPU per turn, user / system (us) | host steal A / B (%) |")
print("|---:|---|---|---|---|---|")
for r in range(rounds):
    a, b = rows["A"][r], rows["B"][r]
    print(f"| {r + 1} | {a['p50']:.0f} / {a['p99']:.0f} | {a['user']:.1f} / {a['system']:.1f} "
          f"| {b['p50']:.0f} / {b['p99']:.0f} | {b['user']:.1f} / {b['system']:.1f} | {steal(a)} / {steal(b)} |")
med = {t: {k: statistics.median(x[k] for x in rows[t]) for k in ("p50", "p99", "user", "system", "cpu", "eps")} for t in "AB"}
print()
for k, name in (("cpu", "CPU per turn"), ("user", "user CPU per turn"), ("p50", "event latency p50"), ("p99", "event latency p99"),
                ("eps", "events/s")):
    a, b = med["A"][k], med["B"][k]
    print(f"median {name}: A {a:.1f}, B {b:.1f}, B/A {b / a:.3f}" if a else f"median {name}: A {a}, B {b}")
cheaper = sum(rows["B"][r]["cpu"] < rows["A"][r]["cpu"] for r in range(rounds))
print(f"B spent less CPU per turn than A in {cheaper} of {rounds} rounds")
errors = sum(x["errors"] for t in "AB" for x in rows[t])
if errors:
    print(f"ERRORS: {errors} failed turns (see the runs)")
    sys.exit(1)
EOF
