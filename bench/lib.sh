# Sourced by bench/compare.sh, bench/ab.sh, bench/ab-reconnect.sh and bench/instructions.sh: a
# scratch directory and
# the processes a run starts (append their pids to PIDS), both cleaned up when the script
# exits; a free port on 127.0.0.1, a bounded wait for a port to open, and the benchmark
# gateway's config.
TMP=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }

# The benchmark gateway's gateway.yaml on stdout: listen on 127.0.0.1:$1, the mock on
# 127.0.0.1:$2 as the upstream, pooling $3 (true unless given), no client keys, pool and
# per-client limits out of the way (one tenant opens all 9500 idle sessions of workload (d)),
# warnings only.
bench_gateway_yaml() {
  cat <<EOF
listen: 127.0.0.1:$1
clients: []
upstream:
  url: ws://127.0.0.1:$2/v1/responses
accounts:
  - id: bench
    api_key_env: HOME
pool:
  enabled: ${3:-true}
  max_per_account: 100000
  max_total: 100000
limits:
  max_connections_per_client: 0
log:
  level: warn
EOF
}

# The two builds of an A/B script (bench/ab.sh, bench/ab-reconnect.sh): sets A and B to the
# binaries given (resolved where the script was started), or prints the script's header
# comment and exits; then moves to the repository root.
ab_builds() {
  if [ $# -ne 2 ]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit 2
  fi
  A=$(realpath "$1"); B=$(realpath "$2")
  cd "$(dirname "$0")/.."
}
