# Sourced by the bench's shell scripts (instructions.sh, ab.sh): a work dir, processes stopped
# by pid on exit, free ports, waiting for a port. Set `work` first (mktemp -d).
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
