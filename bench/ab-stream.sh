#!/usr/bin/env bash
# Workload (a) of bench/compare.sh (one session, one turn of many small deltas) side by side,
# in alternating rounds: direct, nginx, the tokio byte proxy and two gateway builds, all behind
# one mock. Per round: each target's events/s, the middle's CPU per million events (from
# /proc, `wsgate loadgen --cpu-pid`; for direct the mock's) and the host's steal; then each
# build's events/s against nginx's in the same round, per round and as the median. The order
# of the targets rotates every round, so none always runs right after another. This is how
# far (a)'s ratio moves from one round to the next on this host, and whether a longer stream
# settles it (DELTAS="300000 2000000": each size in turn, the same rounds for each).
#
# Usage: bench/ab-stream.sh BIN_A BIN_B            two wsgate binaries (B may be A: the noise floor)
#        ROUNDS=8 bench/ab-stream.sh ...           rounds per stream size (default 8)
#        DELTAS="300000 1000000" ...               stream sizes (default 300000, compare.sh's)
#        ENV_B="TOKIO_WORKER_THREADS=1" ...        environment for B only (a knob instead of a build)
# The load generator and mock are BIN_A's; nginx is Debian's (skipped, loudly, without it).
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
ab_builds "$@"
ROUNDS=${ROUNDS:-8}; DELTAS=${DELTAS:-300000}; ENV_B=${ENV_B:-}
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
cargo build --release --quiet --example byte_proxy
BYTE_PROXY=$PWD/target/release/examples/byte_proxy

MOCK_PORT=$(free_port)
"$A" mock-upstream --listen "127.0.0.1:$MOCK_PORT" --speed >"$TMP/mock.log" 2>&1 &
MOCK_PID=$!; PIDS+=("$MOCK_PID"); wait_port "$MOCK_PORT"

declare -A PORT PID
TARGETS="direct"
PORT[direct]=$MOCK_PORT; PID[direct]=$MOCK_PID
if [ -x "$NGINX" ]; then
  PORT[nginx]=$(free_port); mkdir -p "$TMP/nginx/logs"
  bench_nginx_conf "$TMP/nginx" "${PORT[nginx]}" "$MOCK_PORT" auto >"$TMP/nginx/nginx.conf"
  "$NGINX" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -g 'daemon off;' >"$TMP/nginx.log" 2>&1 &
  PID[nginx]=$!; PIDS+=("${PID[nginx]}"); TARGETS="$TARGETS nginx"
else
  echo "WARNING: nginx is not installed (Debian: apt-get install nginx); the builds are compared with each other only" >&2
fi
PORT[tokiocopy]=$(free_port)
"$BYTE_PROXY" "127.0.0.1:${PORT[tokiocopy]}" "127.0.0.1:$MOCK_PORT" >"$TMP/byte_proxy.log" 2>&1 &
PID[tokiocopy]=$!; PIDS+=("${PID[tokiocopy]}"); TARGETS="$TARGETS tokiocopy"
start_ab_gateways "$MOCK_PORT"
TARGETS="$TARGETS A B"
for t in $TARGETS; do wait_port "${PORT[$t]}"; done

echo "A: $A"
echo "B: $B${ENV_B:+ (with $ENV_B)}"
read -ra ORDER <<<"$TARGETS"
for d in $DELTAS; do
  echo "workload: 1 session x 1 turn of $d deltas, $ROUNDS rounds"
  # One short stream each first: every middle has dialled the mock before the first round.
  for t in $TARGETS; do
    "$A" loadgen --url "ws://127.0.0.1:${PORT[$t]}/v1/responses" --sessions 1 --turns 1 --deltas 1000 \
      >"$TMP/loadgen.log" 2>&1 || { echo "warm-up stream through $t failed:" >&2; cat "$TMP/loadgen.log" >&2; exit 1; }
  done
  for r in $(seq "$ROUNDS"); do
    n=${#ORDER[@]}
    for i in $(seq 0 $((n - 1))); do
      t=${ORDER[$(((i + r) % n))]}
      "$A" loadgen --url "ws://127.0.0.1:${PORT[$t]}/v1/responses" --label "$t" --json "$TMP/$d-$t-$r.json" \
        --sessions 1 --turns 1 --deltas "$d" --cpu-pid "${PID[$t]}" >"$TMP/loadgen.log" 2>&1 \
        || { cat "$TMP/loadgen.log" >&2; exit 1; }
    done
  done
  python3 - "$TMP" "$d" "$ROUNDS" "$TARGETS" <<'EOF'
import json, statistics, sys
tmp, deltas, rounds, targets = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split()
runs = {t: [json.load(open(f"{tmp}/{deltas}-{t}-{r}.json")) for r in range(1, rounds + 1)] for t in targets}
errors = sum(x["errors"] for t in targets for x in runs[t])
if errors:
    sys.exit(f"ERRORS: {errors} failed turns")
def eps(x): return x["events_per_s"] / 1e6
def cpu(x):
    c = x.get("cpu_s_per_million_events")
    return "-" if c is None else f"{c:.2f}"
def steal(x):
    s = x.get("host_steal_pct")
    return "-" if s is None else f"{s:.1f}"
print()
print("| round | " + " | ".join(f"{t} M events/s (CPU s/M)" for t in targets) + " | host steal, max (%) |")
print("|---:|" + "---|" * len(targets) + "---:|")
for r in range(rounds):
    cells = [f"{eps(runs[t][r]):.2f} ({cpu(runs[t][r])})" for t in targets]
    worst = max((x.get("host_steal_pct") or 0) for x in (runs[t][r] for t in targets))
    print(f"| {r + 1} | " + " | ".join(cells) + f" | {worst:.1f} |")
print()
for t in targets:
    print(f"median {t}: {statistics.median(eps(x) for x in runs[t]):.2f}M events/s")
ref = "nginx" if "nginx" in targets else "A"
for t in [t for t in ("A", "B", "tokiocopy") if t != ref]:
    ratios = [eps(runs[t][r]) / eps(runs[ref][r]) for r in range(rounds)]
    below = sum(x < 1.0 for x in ratios)
    print(f"{t} / {ref} per round: {', '.join(f'{x:.2f}' for x in ratios)} "
          f"(median {statistics.median(ratios):.2f}, {min(ratios):.2f}-{max(ratios):.2f}, below 1.0 in {below} of {rounds})")
print()
EOF
done
