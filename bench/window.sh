#!/usr/bin/env bash
# What a gateway build's thread runs on either side of a turn's answer `send`: the CPU samples
# (perf's cpu-clock, one every SAMPLE_NS of on-CPU time, no call chains) that fall between the
# exit of the `recvfrom` that read the answer (>= 2,000 bytes: the mock writes a turn's ~2.9 KB
# answer at once) and the `sendto` that relays it ("before the send": it delays the answer),
# and between that `sendto`'s return and the thread's next `epoll_wait` ("after the send": on
# loopback the kernel wakes the client's reader on the sender's CPU, so it runs only once this
# thread stops; see bench/path.sh). Workload (b)'s turn shape with few sessions (what a turn
# costs, not queueing). Prints each window's count, length (perf's own overhead included, so
# longer than untraced) and its symbols by samples. The sampling slows the gateway several
# times over: read the shares, not the times.
#
# Usage: bench/window.sh BIN                   a wsgate build (also the mock and load generator)
#        SESSIONS=8 TURNS=300 THINK=20ms SAMPLE_NS=25000 TOP=30 bench/window.sh BIN
set -euo pipefail
if [ $# -ne 1 ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
fi
command -v perf >/dev/null || { echo "perf is not installed (Debian: apt-get install linux-perf)" >&2; exit 1; }
BIN=$(realpath "$1")
cd "$(dirname "$0")/.."
SESSIONS=${SESSIONS:-8}; TURNS=${TURNS:-300}; THINK=${THINK:-20ms}; SAMPLE_NS=${SAMPLE_NS:-25000}; TOP=${TOP:-30}
# shellcheck source=bench/lib.sh
source bench/lib.sh

MP=$(free_port); GP=$(free_port)
"$BIN" mock-upstream --listen "127.0.0.1:$MP" --speed >"$TMP/mock.log" 2>&1 &
PIDS+=($!)
conf=$(bench_gateway_config window "$GP" "$MP")
"$BIN" --config "$conf" run >"$TMP/gateway.log" 2>&1 &
GW=$!; PIDS+=("$GW")
wait_port "$MP"; wait_port "$GP"
load() {
  "$BIN" loadgen --url "ws://127.0.0.1:$GP/v1/responses" --label window \
    --mock-url "ws://127.0.0.1:$MP/v1/responses" --json "$TMP/run.json" \
    --sessions "$SESSIONS" --turns "$1" --deltas 5 --think "$THINK" --think-jitter 0.5 >/dev/null 2>&1
}
load 3 # connections open, the pool warm
EVENTS=syscalls:sys_enter_epoll_wait,syscalls:sys_exit_recvfrom,syscalls:sys_enter_sendto,syscalls:sys_exit_sendto
perf record -q -e "$EVENTS" -e cpu-clock -c "$SAMPLE_NS" -p "$GW" -o "$TMP/perf.data" >/dev/null 2>&1 &
rec=$!; PIDS+=("$rec") # stopped with the rest if a load run fails
sleep 0.5
load "$TURNS"
kill -INT "$rec"; wait "$rec" || true
perf script -i "$TMP/perf.data" -F tid,time,event,ip,sym,trace 2>/dev/null >"$TMP/trace.txt"
echo "build: $BIN"
echo "workload: $SESSIONS sessions x $TURNS turns, 5 deltas, think $THINK (x[0.5, 1.5]); a sample every $SAMPLE_NS ns on CPU"
python3 - "$TMP/trace.txt" "$TMP/run.json" "$TOP" <<'PY'
import collections, json, re, statistics, sys
trace, run, top = sys.argv[1], sys.argv[2], int(sys.argv[3])
LINE = re.compile(r"\s*(\d+)\s+([\d.]+):\s+(\S+):\s*(.*)")
# The syscall that opens each window (an answer's size) and the one that closes it.
OPENS = {"syscalls:sys_exit_recvfrom": "before", "syscalls:sys_exit_sendto": "after"}
CLOSES = {"syscalls:sys_enter_sendto": "before", "syscalls:sys_enter_epoll_wait": "after"}
state, start = {}, {}
samples = {"before": collections.Counter(), "after": collections.Counter()}
lengths = {"before": [], "after": []}


def ret(rest):
    m = re.search(r"0x([0-9a-f]+)", rest)
    return int(m.group(1), 16) if m else 0


for line in open(trace):
    m = LINE.match(line)
    if not m:
        continue
    tid, ts, event, rest = m.group(1), float(m.group(2)), m.group(3), m.group(4)
    if event in OPENS and 2000 <= ret(rest) < 100000:
        state[tid], start[tid] = OPENS[event], ts
    elif event in CLOSES:
        if state.get(tid) == CLOSES[event]:
            lengths[CLOSES[event]].append(ts - start[tid])
        state[tid] = None
    elif event == "cpu-clock" and state.get(tid):
        parts = rest.split(None, 1)
        symbol = re.sub(r"::h[0-9a-f]{16}$", "", parts[1].strip()) if len(parts) > 1 else "?"
        samples[state[tid]][symbol] += 1
lat = json.load(open(run)).get("event_latency_us", {})
print(f"event latency (traced) p50 {lat.get('p50', 0):,.0f} / p99 {lat.get('p99', 0):,.0f} us")
for window in ("before", "after"):
    ls = sorted(lengths[window])
    if not ls:
        print(f"\n{window} the send: no window found")
        continue
    total = sum(samples[window].values())
    print(f"\n{window} the send: {len(ls)} windows, length p50 {statistics.median(ls) * 1e6:.0f} / "
          f"p90 {ls[int(len(ls) * 0.9)] * 1e6:.0f} us, {total} samples\n")
    print("| samples | share | symbol |")
    print("|---:|---:|---|")
    for symbol, n in samples[window].most_common(top):
        print(f"| {n} | {100 * n / total:.1f}% | `{symbol[:120]}` |")
PY
