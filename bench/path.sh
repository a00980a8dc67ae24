#!/usr/bin/env bash
# Where a turn's answer waits inside the middle process: for each target, the time from the
# `recv` that reads the answer from the upstream side to the `send` that writes it to the
# client, split into the middle's own work between the two calls and the `send` itself
# (which on loopback also delivers to the receiver). Measured with the kernel's syscall
# tracepoints (`perf record -e syscalls:...`, no sampling, a few us of overhead per call,
# the same for every target), on workload (b)'s turn shape with 8 sessions (little queueing:
# what a hop costs, not waiting behind other sessions). Targets run in alternating rounds
# against the same mock: nginx and the tokio byte proxy as references, then each wsgate
# build given. The answer is the first read of at least 2,000 bytes after a wake-up (the
# mock writes a turn's answer, ~2.9 KB, in one write) and the first send of as many bytes
# after it on the same thread.
#
# A second run per round and target, traced on every CPU (`perf record -a`: the scheduler's
# wake-ups and switches, and the exits of reads and sends of at least 2,000 bytes), times the
# other side of the `send`: from its return to the moment the load generator's thread that
# it woke gets a CPU. On loopback the kernel wakes that reader on the sender's CPU (a TCP
# wake-up is a "sync" one: the waker is expected to sleep soon), so the reader runs only once
# the middle's thread stops: whatever the middle does after the `send` adds to the latency
# of a client on the same machine.
#
# Usage: bench/path.sh BIN [BIN ...]      wsgate builds (the first's mock and load generator)
#        ROUNDS=3 SESSIONS=8 TURNS=200 THINK=20ms bench/path.sh ...
set -euo pipefail
if [ $# -lt 1 ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
fi
command -v perf >/dev/null || { echo "perf is not installed (Debian: apt-get install linux-perf)" >&2; exit 1; }
BINS=()
for b in "$@"; do BINS+=("$(realpath "$b")"); done
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}; SESSIONS=${SESSIONS:-8}; TURNS=${TURNS:-200}; THINK=${THINK:-20ms}
# shellcheck source=bench/lib.sh
source bench/lib.sh
TOOLS=${BINS[0]}
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
BYTE_PROXY=${BYTE_PROXY:-target/release/examples/byte_proxy}
[ -x "$BYTE_PROXY" ] || cargo build --release --locked --example byte_proxy >/dev/null 2>&1

MP=$(free_port)
"$TOOLS" mock-upstream --listen "127.0.0.1:$MP" --speed >"$TMP/mock.log" 2>&1 &
MOCK_PID=$!; PIDS+=("$MOCK_PID")
declare -A PORT PID
TARGETS=()
if [ -x "$NGINX" ]; then
  PORT[nginx]=$(free_port)
  mkdir -p "$TMP/nginx"
  bench_nginx_conf "$TMP/nginx" "${PORT[nginx]}" "$MP" 1 >"$TMP/nginx/nginx.conf"
  # One worker, so the one process traced is the one that relays.
  "$NGINX" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -g 'daemon off; master_process off;' >"$TMP/nginx.log" 2>&1 &
  PID[nginx]=$!; PIDS+=("${PID[nginx]}"); TARGETS+=(nginx)
else
  echo "WARNING: nginx not found; the nginx reference is left out" >&2
fi
PORT[tokiocopy]=$(free_port)
"$BYTE_PROXY" "127.0.0.1:${PORT[tokiocopy]}" "127.0.0.1:$MP" >"$TMP/byte_proxy.log" 2>&1 &
PID[tokiocopy]=$!; PIDS+=("${PID[tokiocopy]}"); TARGETS+=(tokiocopy)
for i in "${!BINS[@]}"; do
  t="wsgate-$((i + 1))"
  PORT[$t]=$(free_port)
  conf=$(bench_gateway_config "$t" "${PORT[$t]}" "$MP")
  "${BINS[$i]}" --config "$conf" run >"$TMP/$t.log" 2>&1 &
  PID[$t]=$!; PIDS+=("${PID[$t]}"); TARGETS+=("$t")
done
wait_port "$MP"
for t in "${TARGETS[@]}"; do wait_port "${PORT[$t]}"; done

EVENTS=syscalls:sys_enter_epoll_wait,syscalls:sys_exit_epoll_wait
for sc in recvfrom read sendto write writev; do
  EVENTS+=",syscalls:sys_enter_$sc,syscalls:sys_exit_$sc"
done
WAKE_EVENTS=(-e sched:sched_switch -e sched:sched_wakeup)
for sc in recvfrom read sendto write writev; do
  WAKE_EVENTS+=(-e "syscalls:sys_exit_$sc" --filter 'ret >= 2000 && ret < 100000')
done
load() { # target turns
  "$TOOLS" loadgen --url "ws://127.0.0.1:${PORT[$1]}/v1/responses" --label "$1" \
    --mock-url "ws://127.0.0.1:$MP/v1/responses" --json "$TMP/run.json" \
    --sessions "$SESSIONS" --turns "$2" --deltas 5 --think "$THINK" --think-jitter 0.5 >/dev/null 2>&1
}
for r in $(seq "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do
    load "$t" 3 # connections open, the pool warm
    perf record -q -e "$EVENTS" -p "${PID[$t]}" -o "$TMP/perf.data" >/dev/null 2>&1 &
    rec=$!; PIDS+=("$rec") # stopped with the rest if a load run fails
    sleep 0.5
    load "$t" "$TURNS"
    kill -INT "$rec"; wait "$rec" || true
    perf script -i "$TMP/perf.data" -F tid,time,event,trace 2>/dev/null >"$TMP/trace-$t-$r.txt"
    cp "$TMP/run.json" "$TMP/run-$t-$r.json"
    # The reader's side, system-wide.
    perf record -q -a "${WAKE_EVENTS[@]}" -o "$TMP/perf.data" >/dev/null 2>&1 &
    rec=$!; PIDS+=("$rec") # stopped with the rest if a load run fails
    sleep 0.5
    load "$t" "$TURNS"
    kill -INT "$rec"; wait "$rec" || true
    { echo "middle ${PID[$t]} mock $MOCK_PID"
      perf script -i "$TMP/perf.data" -F pid,tid,cpu,time,event,trace 2>/dev/null; } >"$TMP/wake-$t-$r.txt"
  done
done

echo "workload: $SESSIONS sessions x $TURNS turns, 5 deltas, think $THINK (x[0.5, 1.5]); $ROUNDS rounds, targets alternating"
echo
python3 - "$TMP" "$ROUNDS" "${TARGETS[@]}" <<'PY'
import json, re, statistics, sys
tmp, rounds, targets = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
LINE = re.compile(r"\s*(\d+)\s+([\d.]+):\s+syscalls:sys_(enter|exit)_(\w+):\s*(\S*)")
RECV, SEND = ("recvfrom", "read"), ("sendto", "write", "writev")

def windows(path):
    """(work, send) in us per answer: recv exit -> send enter, and the send call itself."""
    entered, answer, out = {}, {}, []
    for line in open(path):
        m = LINE.match(line)
        if not m:
            continue
        tid, ts, edge, call, ret = m.groups()
        ts = float(ts) * 1e6
        if edge == "enter":
            entered[tid] = ts
            continue
        n = int(ret, 16) if ret.startswith("0x") else -1
        if call in RECV and 2000 <= n < 1 << 40:
            answer[tid] = ts
        elif call in SEND and 2000 <= n < 1 << 40 and tid in answer:
            out.append((entered[tid] - answer.pop(tid), ts - entered[tid]))
    return out

print("| target | answers | middle's work before the send, p50 / p90 (us) | the send, p50 (us) | event latency p50 / p99 (us), median of rounds |")
print("|---|---:|---|---:|---|")
for t in targets:
    work, send, p50, p99 = [], [], [], []
    for r in range(1, rounds + 1):
        for w, s in windows(f"{tmp}/trace-{t}-{r}.txt"):
            work.append(w); send.append(s)
        run = json.load(open(f"{tmp}/run-{t}-{r}.json"))
        p50.append(run["event_latency_us"]["p50"]); p99.append(run["event_latency_us"]["p99"])
    if not work:
        print(f"| {t} | 0 | - | - | - |")
        continue
    work.sort()
    print(f"| {t} | {len(work)} | {statistics.median(work):.1f} / {work[int(len(work) * 0.9)]:.1f} | "
          f"{statistics.median(send):.1f} | {statistics.median(p50):.0f} / {statistics.median(p99):.0f} |")

WAKE = re.compile(r"\s*(\d+)/(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+sched:sched_wakeup:.* pid=(\d+) .*target_cpu=(\d+)")
SWITCH = re.compile(r"\s*(\d+)/(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+sched:sched_switch:.* next_pid=(\d+)")
EXIT = re.compile(r"\s*(\d+)/(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+syscalls:sys_exit_(\w+):")

def reader_waits(path):
    """Per answer the middle sent whose reader was asleep: (us from the send's return until
    that reader runs, whether it was woken on the sender's CPU)."""
    lines = open(path).read().splitlines()
    head = lines[0].split()
    middle, mock = head[1], head[3]
    # The load generator's threads: those that read answers, in neither the middle nor the mock.
    readers = set()
    for line in lines[1:]:
        m = EXIT.match(line)
        if m and m.group(1) not in (middle, mock) and m.group(5) in RECV:
            readers.add(m.group(2))
    recent, pending, out = [], {}, []
    for line in lines[1:]:
        m = WAKE.match(line)
        if m:
            pid, tid, cpu, ts, woken, target = m.groups()
            if woken in readers:
                recent.append((float(ts) * 1e6, tid, woken, target))
                del recent[:-16]
            continue
        m = SWITCH.match(line)
        if m:
            ts, nxt = float(m.group(4)) * 1e6, m.group(5)
            if nxt in pending:
                sent, same = pending.pop(nxt)
                out.append((ts - sent, same))
            continue
        m = EXIT.match(line)
        if m and m.group(1) == middle and m.group(5) in SEND:
            pid, tid, cpu, ts, _ = m.groups()
            ts = float(ts) * 1e6
            # The reader this send woke: a load generator thread, woken by this thread
            # during the send (the wake-up is traced before the send returns).
            for w_ts, waker, woken, target in reversed(recent):
                if waker == tid and ts - 40 <= w_ts <= ts and woken not in pending:
                    pending[woken] = (ts, target == cpu)
                    break
    return out

print()
print("| target | answers whose reader was woken | reader woken on the sender's CPU | from the send's return until the reader runs, p50 / p90 (us) |")
print("|---|---:|---:|---|")
for t in targets:
    waits = []
    for r in range(1, rounds + 1):
        waits += reader_waits(f"{tmp}/wake-{t}-{r}.txt")
    if not waits:
        print(f"| {t} | 0 | - | - |")
        continue
    ws = sorted(w for w, _ in waits)
    same = sum(1 for _, s in waits if s)
    print(f"| {t} | {len(waits)} | {100 * same / len(waits):.0f}% | {statistics.median(ws):.1f} / {ws[int(len(ws) * 0.9)]:.1f} |")
PY
for i in "${!BINS[@]}"; do echo "wsgate-$((i + 1)): ${BINS[$i]}"; done
