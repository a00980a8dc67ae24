#!/usr/bin/env bash
# Syscalls per turn of middle processes, counted by `strace -c -f` attached to each while the
# same load generator runs workload (b)'s turn shape through it against the same mock (the
# mock at `--speed`, think 20ms): wsgate builds and, by name, `pooledcopy` (the least a pooled
# middle can do, examples/pooled_relay.rs). Counts, not times: strace slows every call, so its
# times say nothing about the middle. With RECONNECT=1 the shape is workload (c)'s, a new
# client connection every turn on a pooled upstream (what a reconnect costs in syscalls).
# The wake-up calls (futex, epoll_wait, write to the runtime's eventfd) move between runs of
# the same binary with how the turns fall on the runtime's threads; the rest is exact.
#
# Usage: bench/syscalls.sh BIN [BIN|pooledcopy ...]   the first must be a wsgate binary (its
#                                                      mock and load generator are used)
#        RECONNECT=1 bench/syscalls.sh BIN pooledcopy  workload (c)'s shape
#        SESSIONS=16 TURNS=50 bench/syscalls.sh ...   the workload (defaults; 5 turns of warm-up
#                                                      each, not counted)
set -euo pipefail
command -v strace >/dev/null || { echo "strace is not installed (Debian: apt-get install strace)" >&2; exit 1; }
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
middle_targets "$@"
SESSIONS=${SESSIONS:-16}; TURNS=${TURNS:-50}
SHAPE=(); [ -n "${RECONNECT:-}" ] && SHAPE=(--reconnect-every-turn)
TOOLS=${MIDDLES[0]}
start_mock "$TOOLS"

echo "workload: $SESSIONS sessions x $TURNS turns, 5 deltas, think 20ms${RECONNECT:+, a new client connection every turn} (after a warm-up of 5 turns each); syscalls per turn"
echo
for i in "${!MIDDLES[@]}"; do
  t=${MIDDLES[$i]}
  port=$(free_port)
  middle_cmd "$t" "mid-$i" "$port" "$MOCK_PORT"
  "${MIDDLE_CMD[@]}" >"$TMP/mid-$i.log" 2>&1 &
  mid=$!; PIDS+=("$mid"); wait_port "$port"
  load() {
    "$TOOLS" loadgen --url "ws://127.0.0.1:$port/v1/responses" --label "x" \
      --mock-url "ws://127.0.0.1:$MOCK_PORT/v1/responses" --json "$TMP/run-$i.json" \
      --sessions "$SESSIONS" --turns "$1" --deltas 5 --think 20ms "${SHAPE[@]}" \
      >"$TMP/loadgen.log" 2>&1
  }
  load 5
  strace -c -f -p "$mid" -o "$TMP/strace-$i.txt" 2>/dev/null &
  tracer=$!
  sleep 1 # strace attaches to every thread before the counted turns start
  load "$TURNS"
  kill -INT "$tracer"; wait "$tracer" 2>/dev/null || true
  kill "$mid" 2>/dev/null || true
  python3 - "$TMP/strace-$i.txt" "$TMP/run-$i.json" "$t" <<'PY'
import json, sys
counts = {}
for line in open(sys.argv[1]):
    f = line.split()
    # strace -c rows: % time, seconds, usecs/call, calls, [errors], syscall
    if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
        counts[f[-1]] = int(f[3])
turns = json.load(open(sys.argv[2]))["turns_ok"]
print(f"{sys.argv[3]} ({turns} turns): " + ", ".join(
    f"{name} {n / max(turns, 1):.2f}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1])))
PY
done
