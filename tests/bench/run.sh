#!/usr/bin/env bash
# tether's benchmark: tether (sticky, Redis), tether with affinity off, HAProxy (stick-table on the
# session cookie), NGINX (hash $cookie_sid consistent) and the direct backend, measured in one run
# on this machine, interleaved, medians of several rounds. Not a test: it prints figures and writes
# a markdown table (default tests/bench/results.md).
#
#   tests/bench/run.sh [--rounds 3] [--secs 10] [--only s1,s2,s3,s4,s5,s6,s7,s8] [--out FILE]
#
# Installs haproxy, nginx, wrk (and cmake, redis-server) with apt-get when missing; builds tether,
# rideshare and the load tool (bench/) in release. Takes about 15 minutes with the defaults.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tether-target}"

sudo_cmd() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else echo "need root or sudo to run: $*" >&2; return 1
  fi
}

missing=()
for tool in haproxy nginx wrk cmake redis-server python3 openssl; do
  if ! command -v "$tool" >/dev/null 2>&1 && ! [ -x "/usr/sbin/$tool" ]; then
    missing+=("$tool")
  fi
done
# s8's h2load comes in Debian's nghttp2-client.
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  sudo_cmd apt-get update
  sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi
export PATH="$PATH:/usr/sbin"

echo "==> cargo build --release (tether, rideshare, tether-bench)"
cargo build --release --locked -p tether -p rideshare -p tether-bench

# 10,000 idle WebSockets need ~20,000 descriptors in the proxy (client and backend sides). Raise
# the soft limit as far as the hard one allows; bench.py says if s4 must hold fewer.
ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

exec python3 tests/bench/bench.py --bin "$CARGO_TARGET_DIR/release" "$@"
