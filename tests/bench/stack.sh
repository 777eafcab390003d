# Sourced by the bench's shell scripts (instructions.sh, ab.sh), after `work` (a mktemp -d) and
# `bin` (the directory of `tether` and `tether-bench`) are set: processes stopped by pid on
# exit, free ports, waiting for a port, and the stack one tether runs in.
# shellcheck shell=bash
pids=()
cleanup() {
  # TERM, not INT: background jobs of a non-interactive shell ignore SIGINT.
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 300); do
    python3 -c "import socket;socket.create_connection(('127.0.0.1',$1),timeout=1)" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on $1; logs in $work" >&2; return 1
}

# start_stack SOURCES: a Redis of its own on a unix socket (as bench.py runs it), the three
# static backends, and $work/tether.toml for one tether in front of them (threads = 1,
# `sources = SOURCES`, least-connections, that Redis, no access log). Sets redis_sock, rpid,
# bpid and pt (tether's port); the caller starts tether.
start_stack() {
  local sources=$1 p1 p2 p3 pa
  redis_sock="$work/redis.sock"
  redis-server --port 0 --unixsocket "$redis_sock" --save "" --appendonly no --dir "$work" \
    > "$work/redis.log" 2>&1 &
  rpid=$!; pids+=("$rpid")
  p1=$(port); p2=$(port); p3=$(port); pt=$(port); pa=$(port)
  "$bin/tether-bench" backends "b1=127.0.0.1:$p1" "b2=127.0.0.1:$p2" "b3=127.0.0.1:$p3" \
    > "$work/backends.log" 2>&1 &
  bpid=$!; pids+=("$bpid")
  cat > "$work/tether.toml" <<TOML
[server]
listen = ["127.0.0.1:$pt"]
threads = 1
grace_period_secs = 0
graceful_shutdown_timeout_secs = 0
upgrade_sock = "$work/upgrade.sock"
access_log = false
[admin]
listen = "127.0.0.1:$pa"
[affinity]
sources = $sources
policy = "least_connections"
hash_key = "bench runs only: not a secret"
[redis]
url = "redis+unix://$redis_sock"
[[backend]]
id = "b1"
address = "127.0.0.1:$p1"
[[backend]]
id = "b2"
address = "127.0.0.1:$p2"
[[backend]]
id = "b3"
address = "127.0.0.1:$p3"
TOML
  wait_port "$p1"
  for _ in $(seq 100); do [ -S "$redis_sock" ] && return 0; sleep 0.1; done
  echo "redis did not open $redis_sock; logs in $work" >&2; return 1
}
