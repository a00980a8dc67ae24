#!/usr/bin/env bash
# Side-by-side benchmark on this machine, in one run: the same workloads against
#   direct   client -> mock upstream (the physical limit)
#   nginx    a plain WebSocket reverse proxy (Debian nginx)
#   haproxy  a plain WebSocket reverse proxy (Debian haproxy)
#   tokiocopy  the smallest tokio TCP proxy (examples/byte_proxy.rs: copy_bidirectional), in (a)
#            and (b) only: what the runtime and two sockets cost before any relay work
#   pooledcopy  the least a pooled middle can do (examples/pooled_relay.rs: answers the client's
#            handshake itself, keeps one upstream socket per conversation, copies bytes), in (c)
#            only: the ceiling of the reconnect speed-up on this machine
#   wsgate   this gateway (pooling on)
#   nopool   this gateway with pool.enabled: false (workload c's baseline)
# Workloads: (a) one streaming turn, (b) latency under a steady load, (c) reconnect every turn,
# (d) idle sessions' memory, (e) (a) and (b) through the HTTP ingress, (f) scale: many sessions
# streaming at once. (a), (b) and (f) also report the middle process's CPU seconds per million
# relayed events, (c) its CPU per turn (utime + stime from /proc, before and after each run).
# and prints ratio tables (also written to bench/results/latest.md, JSON per run beside it).
#
# Usage: bench/compare.sh            full run (a few minutes on 2 cores)
#        QUICK=1 bench/compare.sh    smaller workloads (smoke test)
#        IDLE_SESSIONS=9500 ...      workload d size (fd limit: 2 per session in a proxy)
#        ONLY=ab bench/compare.sh    only the named workloads (letters; default all)
#        STEAL_MAX=1 STEAL_RETRIES=2 ...  a timed run ((a), (b), (c), (e)) during which the hypervisor
#                                    took more than STEAL_MAX % of the machine's CPU time
#                                    (/proc/stat steal, reported by the load generator) measured
#                                    the neighbours: it is kept in runs/disturbed/ and run again,
#                                    at most STEAL_RETRIES times (the report lists every one, and
#                                    the targets as the first attempts measured them)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/bench/results}
RUNS=$OUT/runs
mkdir -p "$RUNS"
rm -f "$RUNS"/*.json
rm -rf "$RUNS/disturbed"
QUICK=${QUICK:-0}
REPEAT=${REPEAT:-3}
if [ "$QUICK" = 1 ]; then
  A_DELTAS=20000; B_SESSIONS=16; B_TURNS=50; B_THINK=2ms; C_SESSIONS=16; C_TURNS=10; IDLE_SESSIONS=${IDLE_SESSIONS:-1000}; REPEAT=1
  F_SESSIONS=${F_SESSIONS:-300}
else
  A_DELTAS=300000; B_SESSIONS=64; B_TURNS=200; B_THINK=20ms; C_SESSIONS=64; C_TURNS=20; IDLE_SESSIONS=${IDLE_SESSIONS:-9500}
  F_SESSIONS=${F_SESSIONS:-2000}
fi
F_TURNS=3; F_DELTAS=200; F_THINK=500ms
FRESH_COST=${FRESH_COST:-50ms}
ONLY=${ONLY:-abcdef}
STEAL_MAX=${STEAL_MAX:-1}; STEAL_RETRIES=${STEAL_RETRIES:-2}
want() { [[ "$ONLY" == *"$1"* ]]; }

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need haproxy; then
  if need apt-get && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx haproxy >/dev/null
  fi
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)

cargo build --release --quiet
cargo build --release --quiet --example byte_proxy --example pooled_relay
WSGATE=$ROOT/target/release/wsgate
BYTE_PROXY=$ROOT/target/release/examples/byte_proxy
POOLED_RELAY=$ROOT/target/release/examples/pooled_relay
# shellcheck source=bench/lib.sh
source bench/lib.sh

MOCK_PORT=$(free_port); NGINX_PORT=$(free_port); HAPROXY_PORT=$(free_port); GW_PORT=$(free_port); NOPOOL_PORT=$(free_port)
TOKIO_PORT=$(free_port); RELAY_PORT=$(free_port)
MOCK_URL=ws://127.0.0.1:$MOCK_PORT/v1/responses

start_mock() { # args for mock-upstream
  [ -n "${MOCK_PID:-}" ] && { kill "$MOCK_PID" 2>/dev/null || true; wait "$MOCK_PID" 2>/dev/null || true; }
  "$WSGATE" mock-upstream --listen "127.0.0.1:$MOCK_PORT" "$@" >"$TMP/mock.log" 2>&1 &
  MOCK_PID=$!; PIDS+=("$MOCK_PID"); wait_port "$MOCK_PORT"
}

start_proxies() {
  for p in "${PROXY_PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done
  PROXY_PIDS=()
  mkdir -p "$TMP/nginx"
  bench_nginx_conf "$TMP/nginx" "$NGINX_PORT" "$MOCK_PORT" auto >"$TMP/nginx/nginx.conf"
  "$NGINX" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -g 'daemon off;' >"$TMP/nginx.log" 2>&1 &
  NGINX_PID=$!; PROXY_PIDS+=("$NGINX_PID"); PIDS+=("$NGINX_PID")
  cat >"$TMP/haproxy.cfg" <<EOF
global
  maxconn 9900
defaults
  mode http
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  timeout tunnel 1h
frontend f
  bind 127.0.0.1:$HAPROXY_PORT
  default_backend b
backend b
  server mock 127.0.0.1:$MOCK_PORT
EOF
  "$HAPROXY" -f "$TMP/haproxy.cfg" -db >"$TMP/haproxy.log" 2>&1 &
  HAPROXY_PID=$!; PROXY_PIDS+=("$HAPROXY_PID"); PIDS+=("$HAPROXY_PID")
  "$BYTE_PROXY" "127.0.0.1:$TOKIO_PORT" "127.0.0.1:$MOCK_PORT" >"$TMP/byte_proxy.log" 2>&1 &
  TOKIO_PID=$!; PROXY_PIDS+=("$TOKIO_PID"); PIDS+=("$TOKIO_PID")
  "$POOLED_RELAY" "127.0.0.1:$RELAY_PORT" "127.0.0.1:$MOCK_PORT" >"$TMP/pooled_relay.log" 2>&1 &
  RELAY_PID=$!; PROXY_PIDS+=("$RELAY_PID"); PIDS+=("$RELAY_PID")
  for name in wsgate nopool; do
    port=$GW_PORT; pool=true
    [ "$name" = nopool ] && { port=$NOPOOL_PORT; pool=false; }
    conf=$(bench_gateway_config "$name" "$port" "$MOCK_PORT" "$pool")
    "$WSGATE" --config "$conf" run >"$TMP/$name.log" 2>&1 &
    pid=$!; PROXY_PIDS+=("$pid"); PIDS+=("$pid")
    [ "$name" = wsgate ] && GW_PID=$pid || NOPOOL_PID=$pid
  done
  for p in "$NGINX_PORT" "$HAPROXY_PORT" "$TOKIO_PORT" "$RELAY_PORT" "$GW_PORT" "$NOPOOL_PORT"; do wait_port "$p"; done
}

url_of() {
  case $1 in
    direct) echo "$MOCK_URL" ;;
    nginx) echo "ws://127.0.0.1:$NGINX_PORT/v1/responses" ;;
    haproxy) echo "ws://127.0.0.1:$HAPROXY_PORT/v1/responses" ;;
    tokiocopy) echo "ws://127.0.0.1:$TOKIO_PORT/v1/responses" ;;
    pooledcopy) echo "ws://127.0.0.1:$RELAY_PORT/v1/responses" ;;
    wsgate) echo "ws://127.0.0.1:$GW_PORT/v1/responses" ;;
    nopool) echo "ws://127.0.0.1:$NOPOOL_PORT/v1/responses" ;;
  esac
}
pid_of() {
  case $1 in nginx) echo "$NGINX_PID" ;; haproxy) echo "$HAPROXY_PID" ;; tokiocopy) echo "$TOKIO_PID" ;; pooledcopy) echo "$RELAY_PID" ;; wsgate) echo "$GW_PID" ;; nopool) echo "$NOPOOL_PID" ;; direct) echo "$MOCK_PID" ;; esac
}

# The host steal (percent) a run's JSON reports, when it is above STEAL_MAX.
steal_above_max() { # json
  python3 - "$1" "$STEAL_MAX" <<'PY'
import json, sys
try:
    steal = json.load(open(sys.argv[1])).get("host_steal_pct")
except (OSError, ValueError):
    steal = None
if steal is not None and steal > float(sys.argv[2]):
    print(f"{steal:.1f}")
PY
}

run() { # workload target rep args...
  local w=$1 t=$2 r=$3; shift 3
  local json=$RUNS/$w-$t-$r.json attempt=0 steal
  while :; do
    echo "== $w / $t / run $r" >&2
    "$WSGATE" loadgen --url "$(url_of "$t")" --label "$w-$t" --mock-url "$MOCK_URL" --json "$json" "$@" >"$TMP/loadgen.out" 2>&1 \
      || { echo "loadgen $w/$t failed:" >&2; cat "$TMP/loadgen.out" >&2; }
    # Memory (d) and the scale run (f) are not timed against a reference: kept as they are.
    case $w in a|b|bl|c|ea|eb) ;; *) return 0 ;; esac
    [ "$attempt" -lt "$STEAL_RETRIES" ] || return 0
    steal=$(steal_above_max "$json")
    [ -n "$steal" ] || return 0
    echo "   the hypervisor took $steal% of the CPU time during this run (> $STEAL_MAX%): kept in runs/disturbed/, run again" >&2
    mkdir -p "$RUNS/disturbed"
    mv "$json" "$RUNS/disturbed/$w-$t-$r-$attempt.json"
    attempt=$((attempt + 1))
  done
}

# (a) streaming throughput and (b) latency: fast mock, long-lived connections.
if want a || want b || want e; then
start_mock --speed
start_proxies
for r in $(seq "$REPEAT"); do
  for t in direct nginx haproxy tokiocopy wsgate; do
    # In the direct runs the CPU counted is the mock's (the upstream every target shares).
    cpu=(--cpu-pid "$(pid_of "$t")")
    want a && run a "$t" "$r" --sessions 1 --turns 1 --deltas "$A_DELTAS" "${cpu[@]}"
    want b && run b "$t" "$r" --sessions "$B_SESSIONS" --turns "$B_TURNS" --deltas 5 --think "$B_THINK" --think-jitter 0.5 "${cpu[@]}"
    # The same with every pause exactly B_THINK: the sessions stay in lockstep and their turns
    # arrive in bursts (shown beside (b), see the README's Performance section).
    want b && [ "$t" != haproxy ] && [ "$t" != tokiocopy ] && run bl "$t" "$r" --sessions "$B_SESSIONS" --turns "$B_TURNS" --deltas 5 --think "$B_THINK" --think-jitter 0 "${cpu[@]}"
  done
  # (e) the same two workloads through wsgate's HTTP ingress (POST + SSE, same pool, same mock).
  if want e; then
    run ea wsgate "$r" --http --sessions 1 --turns 1 --deltas "$A_DELTAS" --cpu-pid "$GW_PID"
    run eb wsgate "$r" --http --sessions "$B_SESSIONS" --turns "$B_TURNS" --deltas 5 --think "$B_THINK" --think-jitter 0.5 --cpu-pid "$GW_PID"
  fi
done
fi

# (f) scale: F_SESSIONS sessions streaming at once (F_DELTAS deltas per turn, think time).
if want f; then
start_mock --speed
start_proxies
for t in nginx wsgate; do
  run f "$t" 1 --sessions "$F_SESSIONS" --turns "$F_TURNS" --deltas "$F_DELTAS" --think "$F_THINK" \
    --connect-concurrency 256 --rss-pid "$(pid_of "$t")" --cpu-pid "$(pid_of "$t")"
done
fi

# (c) reconnect every turn, with a fresh-connection cost at the upstream.
if want c; then
start_mock --speed --fresh-cost "$FRESH_COST"
start_proxies
for r in $(seq "$REPEAT"); do
  for t in direct nginx haproxy pooledcopy wsgate nopool; do
    cpu=(); [ "$t" != direct ] && cpu=(--cpu-pid "$(pid_of "$t")")
    run c "$t" "$r" --sessions "$C_SESSIONS" --turns "$C_TURNS" --deltas 5 --reconnect-every-turn "${cpu[@]}"
  done
done
fi

# (d) idle sessions: memory per held session in each middle process.
if want d; then
start_mock
start_proxies
sleep 1
for t in nginx haproxy wsgate; do
  run d "$t" 1 --sessions "$IDLE_SESSIONS" --turns 1 --deltas 1 --idle-hold 3s --rss-pid "$(pid_of "$t")" --connect-concurrency 256
  start_proxies # release the held sockets before the next target
  sleep 1
done
fi

python3 "$ROOT/bench/report.py" "$RUNS" "$FRESH_COST" "$IDLE_SESSIONS" "$B_THINK" "$F_SESSIONS x $F_TURNS turns x $F_DELTAS deltas, $F_THINK think" "$STEAL_MAX" | tee "$OUT/latest.md"
