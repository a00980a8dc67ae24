#!/usr/bin/env bash
# A/B of two gateway builds on workload (c) of bench/compare.sh (reconnect every turn, a
# fresh upstream connection costing 50 ms at the mock), in one run: one mock, and for each
# build a pooled and a no-pooling gateway side by side. Each round runs, for each build, the
# no-pooling run and then the pooled run, the builds' order flipping every round. Per round
# and build: both runs' times, the speed-up (compare.sh's (c) figure), and the pooled
# gateway's CPU per reconnect, user and system (from /proc, `wsgate loadgen --cpu-pid`); then
# the medians and B's ratio to A. A pooled run is short (~0.25 s) and CPU-bound across the
# gateway, the load generator and the mock on the same cores, so single runs scatter: judge
# by the medians of many rounds.
#
# Usage: bench/ab-reconnect.sh BIN_A BIN_B       two wsgate binaries (B may be A: the noise floor)
#        ROUNDS=15 bench/ab-reconnect.sh ...     rounds (default 10)
#        SESSIONS=64 TURNS=20 ...                the workload (defaults: compare.sh's full (c))
# The load generator and mock are BIN_A's.
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
ab_builds "$@"
ROUNDS=${ROUNDS:-10}; SESSIONS=${SESSIONS:-64}; TURNS=${TURNS:-20}; FRESH_COST=${FRESH_COST:-50ms}

MOCK_PORT=$(free_port)
"$A" mock-upstream --listen "127.0.0.1:$MOCK_PORT" --speed --fresh-cost "$FRESH_COST" >"$TMP/mock.log" 2>&1 &
PIDS+=($!); wait_port "$MOCK_PORT"

declare -A PORT PID
for t in A B; do
  bin=$A; [ "$t" = B ] && bin=$B
  for pool in true false; do
    k="$t-$pool"
    PORT[$k]=$(free_port)
    conf=$(bench_gateway_config "$k" "${PORT[$k]}" "$MOCK_PORT" "$pool")
    "$bin" --config "$conf" run >"$TMP/$k.log" 2>&1 &
    PID[$k]=$!; PIDS+=("${PID[$k]}")
  done
done
for k in "${!PORT[@]}"; do wait_port "${PORT[$k]}"; done

echo "A: $A"
echo "B: $B"
echo "workload: $SESSIONS conversations x $TURNS turns, reconnecting every turn, fresh cost $FRESH_COST, $ROUNDS rounds"
for r in $(seq "$ROUNDS"); do
  order="A B"; [ $((r % 2)) = 0 ] && order="B A"
  for t in $order; do
    for pool in false true; do
      k="$t-$pool"
      "$A" loadgen --url "ws://127.0.0.1:${PORT[$k]}/v1/responses" --label "$k" \
        --mock-url "ws://127.0.0.1:$MOCK_PORT/v1/responses" --json "$TMP/$k-$r.json" \
        --sessions "$SESSIONS" --turns "$TURNS" --deltas 5 --reconnect-every-turn \
        --cpu-pid "${PID[$k]}" >"$TMP/loadgen.log" 2>&1 || { cat "$TMP/loadgen.log" >&2; exit 1; }
    done
  done
done

python3 - "$TMP" "$ROUNDS" <<'EOF'
import json, statistics, sys
tmp, rounds = sys.argv[1], int(sys.argv[2])
def row(t, r):
    off = json.load(open(f"{tmp}/{t}-false-{r}.json"))
    on = json.load(open(f"{tmp}/{t}-true-{r}.json"))
    per_turn = on["events"] / max(on["turns_ok"], 1)
    user, system = (on.get(k) for k in ("cpu_user_s_per_million_events", "cpu_system_s_per_million_events"))
    if user is None or system is None:
        sys.exit(f"{t} round {r}: no user / system CPU in the report ({on['events']} events, "
                 f"first error {on.get('first_error')})")
    return dict(off=off["elapsed_s"], on=on["elapsed_s"], ratio=off["elapsed_s"] / on["elapsed_s"],
                user=user * per_turn, system=system * per_turn, cpu=(user + system) * per_turn,
                errors=off["errors"] + on["errors"],
                steal=max((x["host_steal_pct"] for x in (on, off) if x.get("host_steal_pct") is not None), default=None))
rows = {t: [row(t, r) for r in range(1, rounds + 1)] for t in "AB"}
print()
# Host steal: the larger of the two runs' (pooled, no pooling) share of the CPU time the
# hypervisor gave other guests (a round above ~1% measured the neighbours; README "Performance").
steal = lambda x: "-" if x["steal"] is None else f"{x['steal']:.1f}"
print("| round | A pooled / no pooling (s) | A speed-up | A CPU per reconnect, user / system (us) "
      "| B pooled / no pooling (s) | B speed-up | B CPU per reconnect, user / system (us) | host steal A / B (%) |")
print("|---:|---|---:|---|---|---:|---|---|")
for r in range(rounds):
    a, b = rows["A"][r], rows["B"][r]
    print(f"| {r + 1} | {a['on']:.3f} / {a['off']:.3f} | {a['ratio']:.2f}x | {a['user']:.0f} / {a['system']:.0f} "
          f"| {b['on']:.3f} / {b['off']:.3f} | {b['ratio']:.2f}x | {b['user']:.0f} / {b['system']:.0f} | {steal(a)} / {steal(b)} |")
print()
for k, name in (("on", "pooled run (s)"), ("off", "no-pooling run (s)"), ("ratio", "speed-up"),
                ("cpu", "gateway CPU per pooled reconnect (us)"), ("user", "of which user (us)")):
    a = statistics.median(x[k] for x in rows["A"]); b = statistics.median(x[k] for x in rows["B"])
    print(f"median {name}: A {a:.3f}, B {b:.3f}, B/A {b / a:.3f}" if a else f"median {name}: A {a}, B {b}")
for t in "AB":
    met = sum(x["ratio"] >= 5 for x in rows[t])
    print(f"{t}: speed-up >= 5x in {met} of {rounds} rounds (min {min(x['ratio'] for x in rows[t]):.2f}x)")
errors = sum(x["errors"] for t in "AB" for x in rows[t])
if errors:
    print(f"ERRORS: {errors} failed turns (see the runs)")
    sys.exit(1)
EOF
