#!/usr/bin/env bash
# Instructions tether executes per proxied request, counted by callgrind: the same figure for the
# same binary and inputs, whatever else the machine does, so a change of 1% shows (wall-clock
# figures from run.sh move 5% between runs). User space only: the kernel's share is not counted.
#
#   tests/bench/instructions.sh [--sources '["cookie:sid"]'] [--requests 3000] [--bin DIR] [--new]
#
# Builds the profiling profile (release code with line tables) unless --bin is given, starts a
# Redis, three static backends and tether under callgrind, sends 1,000 warm-up requests over one
# keep-alive connection (1,000 distinct sid cookies), zeroes the counters, sends --requests more
# and prints the instructions per request. With --new every measured request carries a sid never
# seen before (bench s2's first-assignment path: one Redis round trip each). Keeps the callgrind file with --keep FILE
# (callgrind_annotate --inclusive=yes FILE shows where they go).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

sources='["cookie:sid"]'
requests=3000
bin=""
keep=""
new=0
while [ $# -gt 0 ]; do
  case "$1" in
    --sources) sources="$2"; shift 2 ;;
    --requests) requests="$2"; shift 2 ;;
    --bin) bin="$2"; shift 2 ;;
    --keep) keep="$2"; shift 2 ;;
    --new) new=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

for tool in valgrind callgrind_control redis-server python3; do
  command -v "$tool" >/dev/null 2>&1 || { echo "needs $tool (apt-get install valgrind redis-server python3)" >&2; exit 1; }
done
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tether-target}"
if [ -z "$bin" ]; then
  cargo build --profile profiling --locked -p tether -p tether-bench >&2
  bin="$CARGO_TARGET_DIR/profiling"
fi

work=$(mktemp -d /tmp/tether-instructions-XXXXXX)
. "tests/bench/stack.sh"
start_stack "$sources"
RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" \
  "$bin/tether" run -c "$work/tether.toml" > "$work/tether.log" 2>&1 & tpid=$!
pids+=("$tpid")
wait_port "$pt"

send() {
  python3 - "$pt" "$1" "$2" <<'PY'
import http.client, sys
port, n, fresh = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
c = http.client.HTTPConnection("127.0.0.1", port)
for i in range(n):
    sid = "new-%d" % i if fresh else "s%d" % (i % 1000)
    c.request("GET", "/", headers={"Cookie": "sid=" + sid})
    r = c.getresponse(); r.read()
    if r.status != 200:
        sys.exit(f"request {i}: status {r.status}")
PY
}
send 1000 0
callgrind_control -z "$tpid" >/dev/null 2>&1
send "$requests" "$new"
callgrind_control -d "$tpid" >/dev/null 2>&1
dump=""
for _ in $(seq 100); do
  dump=$(ls "$work"/cg.out.* 2>/dev/null | head -n1 || true)
  [ -n "$dump" ] && grep -q '^totals:\|^summary:' "$dump" && break
  sleep 0.1
done
total=$(grep -h '^totals:\|^summary:' "$dump" | head -n1 | awk '{print $2}')
[ -n "$keep" ] && cp "$dump" "$keep"
what="keep-alive GETs on 1,000 pinned sessions"
[ "$new" = 1 ] && what="a new session per request"
echo "sources = $sources, $what: $((total / requests)) instructions per request (user space, $requests requests)"
