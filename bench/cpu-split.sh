#!/usr/bin/env bash
# Where the machine's CPU goes in workload (c) of bench/compare.sh (reconnect every turn,
# wsgate with pooling on): `perf record -a` samples every CPU while the load generator runs,
# and each sample is charged to the gateway, the mock upstream, the load generator or the
# rest (idle, other processes), split into user space and kernel. (c) is CPU-bound on two
# cores once the first turns' fresh connections are open, so this says how much of its time
# the gateway's own code could win back at most: its user share.
#
# Usage: bench/cpu-split.sh                 64 conversations x 20 turns, 6 runs sampled
#        RUNS=3 SESSIONS=16 bench/cpu-split.sh
#        OUT=file bench/cpu-split.sh          also write the table to a file
#        WSGATE=path/to/wsgate bench/cpu-split.sh   another build (gateway, mock and load generator)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v perf >/dev/null || { echo "SKIPPED: perf is not installed (Debian: apt-get install linux-perf)" >&2; exit 1; }
RUNS=${RUNS:-6}; SESSIONS=${SESSIONS:-64}; TURNS=${TURNS:-20}
if [ -z "${WSGATE:-}" ]; then
  cargo build --release --quiet
  WSGATE=$PWD/target/release/wsgate
fi
# shellcheck source=bench/lib.sh
source bench/lib.sh

MOCK_PORT=$(free_port); GW_PORT=$(free_port)
"$WSGATE" mock-upstream --listen "127.0.0.1:$MOCK_PORT" --speed >"$TMP/mock.log" 2>&1 &
MOCK_PID=$!; PIDS+=("$MOCK_PID")
conf=$(bench_gateway_config gw "$GW_PORT" "$MOCK_PORT")
"$WSGATE" --config "$conf" run >"$TMP/gw.log" 2>&1 &
GW_PID=$!; PIDS+=("$GW_PID")
wait_port "$MOCK_PORT"; wait_port "$GW_PORT"

# One load generator run: SESSIONS conversations, the turns given, reconnecting every turn.
# It exits non-zero when a turn failed, which fails this script (its samples would mislead).
LOADGEN=("$WSGATE" loadgen --url "ws://127.0.0.1:$GW_PORT/v1/responses"
  --mock-url "ws://127.0.0.1:$MOCK_PORT/v1/responses" --sessions "$SESSIONS" --deltas 5
  --reconnect-every-turn --json "$TMP/run.json")
# Warm-up: the conversations' first turns open their upstream connections.
"${LOADGEN[@]}" --turns 3 >"$TMP/loadgen.out" 2>&1 \
  || { echo "loadgen failed:" >&2; cat "$TMP/loadgen.out" >&2; exit 1; }
# The sampled runs, their pids kept (each run is one process); the first failure ends them.
cat >"$TMP/runs.sh" <<EOF
for _ in \$(seq $RUNS); do
  $(printf '%q ' "${LOADGEN[@]}") --turns $TURNS >"$TMP/loadgen.out" 2>&1 &
  echo \$! >>"$TMP/loadgen.pids"
  wait \$! || exit 1
done
EOF
perf record -a -F 4999 -o "$TMP/perf.data" -- bash "$TMP/runs.sh" >"$TMP/perf.log" 2>&1 \
  || { echo "a sampled run failed:" >&2; cat "$TMP/loadgen.out" "$TMP/perf.log" >&2; exit 1; }
perf script -i "$TMP/perf.data" -F pid,ip,dso 2>/dev/null >"$TMP/samples.txt"

python3 - "$TMP/samples.txt" "$GW_PID" "$MOCK_PID" "$TMP/loadgen.pids" "$RUNS x $SESSIONS conversations x $TURNS turns" <<'EOF' | tee "${OUT:-/dev/null}"
import sys
samples, gw, mock, pids_file, what = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
loadgen = set(open(pids_file).read().split())
counts = {}
for line in open(samples):
    parts = line.split()
    if not parts:
        continue
    pid = parts[0].split("/")[0]
    who = "gateway" if pid == gw else "mock upstream" if pid == mock else "load generator" if pid in loadgen else "idle" if pid == "0" else "other"
    where = "kernel" if "kernel" in line else "user"
    counts[(who, where)] = counts.get((who, where), 0) + 1
total = sum(counts.values()) or 1
print(f"CPU samples in workload (c), wsgate pooled ({what}), all CPUs: {total} samples")
print()
print("| process | user | kernel | total |")
print("|---|---:|---:|---:|")
for who in ["gateway", "load generator", "mock upstream", "other", "idle"]:
    u, k = counts.get((who, "user"), 0), counts.get((who, "kernel"), 0)
    print(f"| {who} | {100*u/total:.1f}% | {100*k/total:.1f}% | {100*(u+k)/total:.1f}% |")
u = sum(v for (w, s), v in counts.items() if s == "user" and w != "idle")
k = sum(v for (w, s), v in counts.items() if s == "kernel" and w != "idle")
print()
print(f"All processes: user {100*u/total:.1f}%, kernel {100*k/total:.1f}%.")
EOF
