#!/usr/bin/env bash
# One tether alone under wrk, for A/B comparisons of two builds: starts a Redis (on a unix
# socket, as bench.py does), the three static backends and tether (stack.sh: threads = 1,
# cookie:sid, least-connections), warms up for 2 s, runs wrk for --secs and prints req/s, p99,
# the CPU each process spent per request (tether, with its kernel share, Redis, the backends,
# wrk, from /proc and time(1)), each process's context switches per request, how busy the
# machine was, Redis' commands per request, per socket read and its time per call, and
# tether's RSS at the end. Run the two builds in turns, a few times each: on a shared 2-core
# machine one run moves 10%, and the CPU per request moves less than req/s.
#
#   tests/bench/ab.sh [--bin DIR] [--secs 6] [--conns 64] [--sources '["cookie:sid"]'] [--runs 1] [SCRIPT]
#
# --runs N measures N times back to back on the same stack, each run's figures on their own (Redis'
# per-call times too), with the keys Redis then holds: how a new session's cost moves as Redis and
# tether's pin cache fill.
# SCRIPT is a wrk script of this directory's (default new_sessions.lua, s2; sessions.lua is s1).
# DIR holds `tether` and `tether-bench` (default $CARGO_TARGET_DIR/release; run.sh builds them).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tether-target}"
bin="$CARGO_TARGET_DIR/release"
secs=6
conns=64
# Affinity key sources, as instructions.sh takes them: `[]` is tether with affinity off.
sources='["cookie:sid"]'
script="$here/new_sessions.lua"
runs=1
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin="$2"; shift 2 ;;
    --secs) secs="$2"; shift 2 ;;
    --conns) conns="$2"; shift 2 ;;
    --sources) sources="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    -*) echo "unknown argument $1" >&2; exit 2 ;;
    *) script="$1"; shift ;;
  esac
done
for tool in wrk redis-server redis-cli python3; do
  command -v "$tool" >/dev/null 2>&1 || { echo "needs $tool (apt-get install wrk redis-server python3)" >&2; exit 1; }
done
[ -x /usr/bin/time ] || { echo "needs /usr/bin/time (apt-get install time)" >&2; exit 1; }
for b in tether tether-bench; do
  [ -x "$bin/$b" ] || { echo "no $bin/$b: cargo build --release -p tether -p tether-bench" >&2; exit 1; }
done

work=$(mktemp -d /tmp/tether-ab-XXXXXX)
. "$here/stack.sh"
start_stack "$sources"
RUST_LOG=warn "$bin/tether" run -c "$work/tether.toml" > "$work/tether.log" 2>&1 &
tpid=$!; pids+=("$tpid")
wait_port "$pt"

url="http://127.0.0.1:$pt/"
wrk -t1 -c"$conns" -d2s -s "$script" "$url" -- "warm-$$" > /dev/null
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
sys_cpu() { awk '{print $15}' "/proc/$1/stat"; }
# Context switches of every thread of a process (voluntary: it slept; the rest: preempted).
ctx() { cat /proc/"$1"/task/*/status | awk '/^voluntary_ctxt/{v+=$2} /^nonvoluntary_ctxt/{n+=$2} END{print v + n}'; }
# Commands, socket reads and writes Redis has processed (its INFO stats): reads per command
# say how well tether batches its commands.
commands() {
  redis-cli -s "$redis_sock" info stats | awk -F: '
    /^total_commands_processed/{c=$2+0} /^total_reads_processed/{r=$2+0}
    /^total_writes_processed/{w=$2+0} END{print c, r, w}'
}
# The machine's CPU time (/proc/stat's cpu line: user nice system idle iowait irq softirq ...).
machine() { awk '/^cpu /{print $2 + $3 + $4, $5 + $6, $7 + $8}' /proc/stat; }
for run in $(seq "$runs"); do
# Each run's Redis figures on their own: INFO's counters and per-call times start again.
redis-cli -s "$redis_sock" config resetstat > /dev/null
t0=$(cpu "$tpid"); r0=$(cpu "$rpid"); b0=$(cpu "$bpid"); read -r c0 rd0 wr0 < <(commands)
ts0=$(sys_cpu "$tpid"); x0="$(ctx "$tpid") $(ctx "$rpid") $(ctx "$bpid")"
read -r m_busy0 m_idle0 m_irq0 < <(machine)
/usr/bin/time -o "$work/wrk.time" -f "%w %c %U %S" \
  wrk -t1 -c"$conns" -d"${secs}s" --latency -s "$script" "$url" -- "run-$$-$run" > "$work/wrk.out"
t1=$(cpu "$tpid"); r1=$(cpu "$rpid"); b1=$(cpu "$bpid"); read -r c1 rd1 wr1 < <(commands)
ts1=$(sys_cpu "$tpid"); x1="$(ctx "$tpid") $(ctx "$rpid") $(ctx "$bpid")"
read -r m_busy1 m_idle1 m_irq1 < <(machine)
rss=$(awk '/^VmRSS/{print $2}' "/proc/$tpid/status")
python3 - "$work/wrk.out" "$work/wrk.time" "$(getconf CLK_TCK)" \
  "$((t1 - t0))" "$((r1 - r0))" "$((b1 - b0))" "$((c1 - c0 - 1))" "$rss" "$(basename "$script")" \
  "$((rd1 - rd0 - 1))" "$((wr1 - wr0 - 1))" "$redis_sock" \
  "$((m_busy1 - m_busy0))" "$((m_idle1 - m_idle0))" "$((m_irq1 - m_irq0))" "$((ts1 - ts0))" \
  "$x0" "$x1" "$run" "$runs" "$(redis-cli -s "$redis_sock" dbsize)" <<'PY'
import re, subprocess, sys
out = open(sys.argv[1]).read()
wrk_vol, wrk_inv, wrk_user, wrk_sys = map(float, open(sys.argv[2]).read().split()[-4:])
hz = int(sys.argv[3])
tether, redis, backends, cmds, rss = (int(x) for x in sys.argv[4:9])
reqs = int(re.search(r"(\d+) requests in", out).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
p99 = re.search(r"99%\s+(\S+)", out).group(1)
bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
us = lambda ticks: ticks * 1e6 / hz / max(1, reqs)
run, runs, keys = sys.argv[19], sys.argv[20], int(sys.argv[21])
label = sys.argv[9] + (f" run {run} of {runs}" if runs != "1" else "")
print(f"{label}: {rps:,.0f} req/s, p99 {p99}, {reqs:,} requests"
      f"{', %s non-2xx' % bad.group(1) if bad else ''}; Redis holds {keys:,} keys")
print(f"  CPU us/request: tether {us(tether):.2f} ({us(int(sys.argv[16])):.2f} in the kernel),"
      f" redis {us(redis):.2f}, backends {us(backends):.2f},"
      f" wrk {(wrk_user + wrk_sys) * 1e6 / max(1, reqs):.2f}")
# How often each process slept or was preempted: fewer requests per wake-up cost every process.
sw = [b - a for a, b in zip(map(int, sys.argv[17].split()), map(int, sys.argv[18].split()))]
print(f"  context switches/request: tether {sw[0] / max(1, reqs):.3f}, redis {sw[1] / max(1, reqs):.3f},"
      f" backends {sw[2] / max(1, reqs):.3f}, wrk {(wrk_vol + wrk_inv) / max(1, reqs):.3f}")
reads, writes = int(sys.argv[10]), int(sys.argv[11])
# Redis' own time per call of each command in this run (INFO commandstats, reset before it).
stats = subprocess.run(["redis-cli", "-s", sys.argv[12], "info", "commandstats"],
                       capture_output=True, text=True).stdout
per_call = [f"{m[1].upper()} {float(m[3]):.2f} us x {int(m[2]):,}"
            for m in re.finditer(r"cmdstat_(\w+):calls=(\d+),usec=\d+,usec_per_call=([\d.]+)", stats)
            if m[1] in ("set", "zadd", "hincrby", "evalsha", "get")]
print(f"  Redis commands/request {cmds / max(1, reqs):.3f}, commands per socket read"
      f" {cmds / max(1, reads):.2f}, per write {cmds / max(1, writes):.2f};"
      f" tether RSS {rss / 1024:.1f} MiB")
busy, idle, irq = (int(x) for x in sys.argv[13:16])
total = max(1, busy + idle + irq)
print(f"  machine: {100 * (busy + irq) / total:.0f}% busy ({100 * irq / total:.0f}% in interrupts,"
      f" the loopback's packets), {100 * idle / total:.0f}% idle")
if per_call:
    print(f"  Redis time per call: {', '.join(per_call)}")
PY
done
