# Sourced by bench/compare.sh, bench/ab.sh, bench/ab-reconnect.sh, bench/ab-stream.sh,
# bench/instructions.sh, bench/syscalls.sh, bench/path.sh and bench/window.sh: a scratch
# directory and the processes a run starts (append their pids to PIDS), both cleaned up when
# the script exits; a free port on 127.0.0.1, a bounded wait for a port to open, the mock, the
# benchmark gateway's config and nginx's, and the middles a per-target script measures.
TMP=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }

# Starts BIN's mock upstream (`--speed`, plus any further arguments) on a free port, which it
# puts in MOCK_PORT, and waits until it listens.
# Usage: start_mock BIN [ARG ...]
start_mock() {
  MOCK_PORT=$(free_port)
  "$1" mock-upstream --listen "127.0.0.1:$MOCK_PORT" --speed "${@:2}" >"$TMP/mock.log" 2>&1 &
  PIDS+=($!); wait_port "$MOCK_PORT"
}

# The middles a per-target script (bench/instructions.sh, bench/syscalls.sh) measures, from
# its arguments, in MIDDLES: wsgate binaries (resolved where the script was started) and
# `pooledcopy` (examples/pooled_relay.rs, built here if named), the first a wsgate binary (its
# mock and load generator are used); none prints the script's usage. Then moves to the
# repository root.
# Usage: middle_targets ARG ...
middle_targets() {
  [ $# -ge 1 ] || usage
  MIDDLES=()
  local t
  for t in "$@"; do
    if [ "$t" = pooledcopy ]; then MIDDLES+=(pooledcopy); else MIDDLES+=("$(realpath "$t")"); fi
  done
  if [ "${MIDDLES[0]}" = pooledcopy ]; then
    echo "the first target must be a wsgate binary (its mock and load generator are used)" >&2
    exit 2
  fi
  if printf '%s\n' "${MIDDLES[@]}" | grep -qx pooledcopy; then
    cargo build --release --quiet --example pooled_relay \
      --manifest-path "$(dirname "${BASH_SOURCE[0]}")/../Cargo.toml"
  fi
  cd "$(dirname "$0")/.."
}

# The command line of middle TARGET (from MIDDLES) listening on 127.0.0.1:PORT in front of the
# mock, in MIDDLE_CMD; a gateway's config is written under NAME (see bench_gateway_config).
# Run from the repository root.
# Usage: middle_cmd TARGET NAME PORT MOCK_PORT
middle_cmd() {
  if [ "$1" = pooledcopy ]; then
    MIDDLE_CMD=(target/release/examples/pooled_relay "127.0.0.1:$3" "127.0.0.1:$4")
  else
    MIDDLE_CMD=("$1" --config "$(bench_gateway_config "$2" "$3" "$4")" run)
  fi
}

# The benchmark gateway's gateway.yaml: listen on 127.0.0.1:$2, the mock on 127.0.0.1:$3 as
# the upstream, pooling $4 (true unless given), no client keys, pool and per-client limits out
# of the way (one tenant opens all 9500 idle sessions of workload (d)), warnings only. Written
# to a folder of its own under $TMP, named after $1, and its path printed: the gateway watches
# its config's folder for changes (hot reload), so a file the scripts write while it runs
# (logs, perf.data) must not land beside it, or every write wakes the gateway's watcher.
# Usage: conf=$(bench_gateway_config NAME PORT MOCK_PORT [POOL])
bench_gateway_config() {
  mkdir -p "$TMP/config-$1"
  cat >"$TMP/config-$1/gateway.yaml" <<EOF
listen: 127.0.0.1:$2
clients: []
upstream:
  url: ws://127.0.0.1:$3/v1/responses
accounts:
  - id: bench
    api_key_env: HOME
pool:
  enabled: ${4:-true}
  max_per_account: 100000
  max_total: 100000
limits:
  max_connections_per_client: 0
log:
  level: warn
EOF
  echo "$TMP/config-$1/gateway.yaml"
}

# nginx's configuration for the benchmarks (to stdout): a plain WebSocket reverse proxy on
# 127.0.0.1:PORT to the mock on 127.0.0.1:MOCK_PORT, its files under DIR, WORKERS workers
# ("auto": one per core).
# Usage: bench_nginx_conf DIR PORT MOCK_PORT WORKERS
bench_nginx_conf() {
  cat <<EOF
worker_processes $4;
pid $1/nginx.pid;
error_log stderr warn;
worker_rlimit_nofile 20000;
events { worker_connections 19500; }
http {
  access_log off;
  client_body_temp_path $1; proxy_temp_path $1; fastcgi_temp_path $1;
  uwsgi_temp_path $1; scgi_temp_path $1;
  server {
    listen 127.0.0.1:$2;
    location / {
      proxy_pass http://127.0.0.1:$3;
      proxy_http_version 1.1;
      proxy_set_header Upgrade \$http_upgrade;
      proxy_set_header Connection "upgrade";
      proxy_buffering off;
      proxy_read_timeout 3600s;
    }
  }
}
EOF
}

# Prints the calling script's header comment (its usage) and exits with 2.
usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
}

# The two builds of an A/B script (bench/ab.sh, bench/ab-reconnect.sh, bench/ab-stream.sh):
# sets A and B to the binaries given (resolved where the script was started), or prints the
# script's header comment and exits; then moves to the repository root.
ab_builds() {
  [ $# -eq 2 ] || usage
  A=$(realpath "$1"); B=$(realpath "$2")
  cd "$(dirname "$0")/.."
}

# Starts the two builds of an A/B script as gateways behind the mock on MOCK_PORT (pooling on,
# ENV_B's NAME=value words in B's environment only) and waits for both: sets PORT[A], PORT[B],
# PID[A], PID[B] in the caller's associative arrays PORT and PID (declared with `declare -A`).
# Usage: start_ab_gateways MOCK_PORT
start_ab_gateways() {
  local t
  for t in A B; do
    PORT[$t]=$(free_port)
    bench_gateway_config "$t" "${PORT[$t]}" "$1" >/dev/null
  done
  "$A" --config "$TMP/config-A/gateway.yaml" run >"$TMP/A.log" 2>&1 &
  PID[A]=$!; PIDS+=("${PID[A]}")
  # shellcheck disable=SC2086 # ENV_B is a list of NAME=value words
  env ${ENV_B:-} "$B" --config "$TMP/config-B/gateway.yaml" run >"$TMP/B.log" 2>&1 &
  PID[B]=$!; PIDS+=("${PID[B]}")
  wait_port "${PORT[A]}"; wait_port "${PORT[B]}"
}
