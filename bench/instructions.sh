#!/usr/bin/env bash
# Instructions per turn of gateway builds on workload (b)'s turn shape, counted by valgrind's
# callgrind: the same count for the same binary and inputs whatever else the machine is doing,
# so a change of a few percent in the per-turn work shows, where CPU time on a shared VM
# (bench/ab.sh) moves by more than that between rounds. Each gateway runs under callgrind
# (~50x slower) behind the same mock and load generator; instrumentation is on only while
# the measured turns run (after a warm-up), and counts every thread of the gateway.
# The count varies by ~1-2% between runs of the same binary (how frames fall into reads).
# Instructions are not time (stalls are not counted), but on this VM a turn's user CPU tracked
# them at about 1 ns per instruction for wsgate and the tokio byte proxy alike.
#
# Usage: bench/instructions.sh BIN [BIN ...]        wsgate binaries (the first's tools are used)
#        SESSIONS=16 TURNS=50 bench/instructions.sh  the workload (defaults; 5 deltas, 20ms think)
#        INTERVAL=1ms bench/instructions.sh ...       the mock pauses between deltas (each arrives
#                                                     on its own, as a real upstream streams them)
#        DELTAS=100000 SESSIONS=1 TURNS=2 bench/instructions.sh ...  deltas per turn (default 5):
#                                                     many make workload (a)'s shape, one long stream
#                                                     (instructions per event = per turn / DELTAS)
#        KEEP=DIR bench/instructions.sh ...           keep callgrind's output files (cg-N.out) in DIR
#        RECONNECT=1 bench/instructions.sh ...        workload (c)'s shape: a new client connection
#                                                     every turn (pooled upstream), counted per turn
#        HTTP=1 bench/instructions.sh ...             through the HTTP ingress: every turn a POST
#                                                     answered with server-sent events (workload (e))
#        HTTP=json bench/instructions.sh ...          the same, non-streaming: every turn a POST with
#                                                     `stream: false`, answered with one JSON body
#        bench/instructions.sh BIN pooledcopy         `pooledcopy` (examples/pooled_relay.rs, the
#                                                     least a pooled middle does) as a target too
#                                                     (its `memset` of three 8 KiB buffers counts
#                                                     ~24k: callgrind counts `rep stosb` per byte)
set -euo pipefail
command -v valgrind >/dev/null || { echo "valgrind is not installed (Debian: apt-get install valgrind)" >&2; exit 1; }
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
middle_targets "$@"
SESSIONS=${SESSIONS:-16}; TURNS=${TURNS:-50}; INTERVAL=${INTERVAL:-0s}; DELTAS=${DELTAS:-5}
SHAPE=(); [ -n "${RECONNECT:-}" ] && SHAPE=(--reconnect-every-turn)
[ -n "${HTTP:-}" ] && SHAPE+=(--http)
[ "${HTTP:-}" = json ] && SHAPE+=(--http-json)
BINS=("${MIDDLES[@]}")
TOOLS=${BINS[0]}
start_mock "$TOOLS"

echo "workload: $SESSIONS sessions x $TURNS turns, $DELTAS deltas (mock pause between deltas: $INTERVAL), think 20ms${RECONNECT:+, a new client connection every turn}${HTTP:+, HTTP ingress (POST, $([ "$HTTP" = json ] && echo "one JSON body" || echo SSE))} (after a warm-up of 5 turns each)"
echo
echo "| build | instructions per turn | turns | errors |"
echo "|---|---:|---:|---:|"
for i in "${!BINS[@]}"; do
  bin=${BINS[$i]}
  port=$(free_port)
  middle_cmd "$bin" "gw-$i" "$port" "$MOCK_PORT"
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$TMP/cg-$i.out" \
    "${MIDDLE_CMD[@]}" >"$TMP/gw-$i.log" 2>&1 &
  gw=$!; PIDS+=("$gw")
  for _ in $(seq 600); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  load() {
    "$TOOLS" loadgen --url "ws://127.0.0.1:$port/v1/responses" --label "x" \
      --mock-url "ws://127.0.0.1:$MOCK_PORT/v1/responses" --json "$TMP/run-$i.json" \
      --sessions "$SESSIONS" --turns "$1" --deltas "$DELTAS" --think 20ms --delta-interval "$INTERVAL" "${SHAPE[@]}" \
      >"$TMP/loadgen.log" 2>&1
  }
  load 5
  callgrind_control -i on "$gw" >/dev/null 2>&1
  load "$TURNS"
  callgrind_control -i off "$gw" >/dev/null 2>&1
  # wsgate drains on SIGINT; the copier has no handler (and a background job ignores SIGINT)
  if [ "$bin" = pooledcopy ]; then kill -TERM "$gw"; else kill -INT "$gw"; fi
  wait "$gw" 2>/dev/null || true
  [ -n "${KEEP:-}" ] && mkdir -p "$KEEP" && cp "$TMP/cg-$i.out" "$KEEP/"
  python3 - "$TMP/cg-$i.out" "$TMP/run-$i.json" "$bin" <<'PY'
import json, sys
total = 0
for line in open(sys.argv[1]):
    if line.startswith(("summary:", "totals:")):
        total = max(total, int(line.split()[1]))
run = json.load(open(sys.argv[2]))
turns = run["turns_ok"]
print(f"| {sys.argv[3]} | {total / max(turns, 1):,.0f} | {turns} | {run['errors']} |")
PY
done
