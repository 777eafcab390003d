#!/usr/bin/env python3
"""tether's benchmark driver (run it through tests/bench/run.sh, which installs and builds).

Starts, on ports it picks: a Redis of its own (unix socket), three static backends
(tether-bench backends), and in front of them tether (sticky on the `sid` cookie, Redis),
tether with affinity off (`sources = []`, no Redis: tether without stickiness), HAProxy (stick-table
on the `sid` cookie), NGINX (`hash $cookie_sid consistent`), plus the direct backend. Every proxy
gets one worker thread or process. Then, targets interleaved (A B C D E, the next round B C D E A)
for --rounds rounds (s1 and s2 alternating round by round):

  s1  keep-alive GETs, 1,000 distinct session cookies already pinned (wrk -t1 -c64)
  s2  every request a new session (the first-assignment path), same figures + Redis commands
  s3  WebSocket echo, 1,000 connections, 32-byte messages, closed loop: messages/s, p99
  s4  10,000 idle WebSockets held through the proxy: proxy RSS, bytes per connection
  s5  Socket.IO broadcast fan-out through tether to 1,000 clients on three rideshare instances
      (the `drivers` room): emit-to-receipt p50/p99, messages lost; as its direct line, the
      same clients on one rideshare instance without a proxy
  s6  s1 over TLS 1.3 (wrk over https), the three proxies terminating TLS with one ECDSA P-256
      certificate (made for the run with openssl)
  s7  new TLS connections: every request on a new connection (`Connection: close`, wrk resumes
      no session), a full handshake each
  s8  HTTP/2: h2load, 100 clients x 10 concurrent streams, one session

and prints medians (min-max) with each proxy's ratio to direct, and writes them as markdown,
ending with issue 6's targets judged on the medians, and the same comparison per round.
CPU per request is the proxy's user+system time (all its threads and processes) over the
requests wrk counted. Redis commands per request are Redis' total_commands_processed over the
same window (minus the reads of that counter).
"""

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
HERE = Path(__file__).resolve().parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, what, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}; see its log")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on {port} within {timeout}s")


# With --pin the proxy under test runs alone on CPU 1 and everything else (wrk, the load tool,
# backends, Redis) on CPU 0. Not the default: on 2 cores the shared core's scheduling delays
# dominate every proxy's p99 (HAProxy 6-38 ms, NGINX 8-28 ms in one try). rideshare (s5) is never
# pinned.
PIN = {"proxy": None, "load": None}


def pinned(role, cmd):
    cpu = PIN[role]
    return ["taskset", "-c", str(cpu), *cmd] if cpu is not None else list(cmd)


def say(*a):
    print(*a, file=sys.stderr, flush=True)


class Procs:
    """Every process we start, stopped by pid at the end."""

    def __init__(self, work):
        self.work = work
        self.all = []

    def start(self, name, cmd, **kw):
        log = open(self.work / f"{name}.log", "wb")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
        self.all.append((name, p))
        return p

    def stop(self, these):
        for p in these:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in these:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stop_all(self):
        for _, p in reversed(self.all):
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        deadline = time.time() + 10
        for _, p in reversed(self.all):
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d))
    return out


def machine_ticks():
    """The machine's CPU time so far (/proc/stat's `cpu` line, in ticks): (all, stolen by the
    host). Stolen time is what the hypervisor ran on our cores instead of us: a run the host
    took 10% from is slower for reasons none of the targets share with the others."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is counted in user already)
    return sum(f[:8]), f[7] if len(f) > 7 else 0


def host_share(t0):
    """Percent of the machine's CPU time since `t0` (machine_ticks()) stolen by the host."""
    t1 = machine_ticks()
    total = t1[0] - t0[0]
    return 100.0 * (t1[1] - t0[1]) / total if total > 0 else 0.0


def cpu_secs(pids):
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


class Redis:
    def __init__(self, sock):
        self.sock = sock

    def command(self, *args):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(self.sock))
        payload = f"*{len(args)}\r\n" + "".join(f"${len(str(a))}\r\n{a}\r\n" for a in args)
        s.sendall(payload.encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if data.startswith(b"$"):
                n = int(data[1:data.index(b"\r\n")])
                if len(data) >= data.index(b"\r\n") + 2 + n + 2:
                    break
            elif data.endswith(b"\r\n"):
                break
        s.close()
        return data.decode(errors="replace")

    def commands_processed(self):
        m = re.search(r"total_commands_processed:(\d+)", self.command("INFO", "stats"))
        return int(m.group(1))


# --- configs -----------------------------------------------------------------------------------

def tls_cert(work):
    """One self-signed ECDSA P-256 certificate for localhost and 127.0.0.1, for every proxy:
    (cert.pem, key.pem, both in one file for HAProxy)."""
    cert, key, both = work / "cert.pem", work / "key.pem", work / "cert+key.pem"
    if not cert.exists():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "30", "-subj", "/CN=localhost", "-addext",
                        "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                       check=True, capture_output=True)
        both.write_text(cert.read_text() + key.read_text())
    return cert, key, both


def tether_conf(work, name, port, admin, backends, sources, redis_sock, tls_port=None):
    lines = [
        "[server]",
        f'listen = ["127.0.0.1:{port}"]',
        *([f'listen_tls = ["127.0.0.1:{tls_port}"]'] if tls_port else []),
        "threads = 1",
        "grace_period_secs = 0",
        "graceful_shutdown_timeout_secs = 0",
        f'upgrade_sock = "{work}/{name}-upgrade.sock"',
        "access_log = false",
        "keepalive_timeout_secs = 600",
        "[admin]",
        f'listen = "127.0.0.1:{admin}"',
        "[upstream]",
        "tunnel_timeout_secs = 3600",
        "[affinity]",
        f"sources = {json.dumps(sources)}",
        'policy = "least_connections"' if sources else 'policy = "round_robin"',
        'hash_key = "bench only: not a secret at all"',
    ]
    if tls_port:
        cert, key, _ = tls_cert(work)
        lines += ["[tls]", f'certs = [{{ cert = "{cert}", key = "{key}" }}]']
    if redis_sock:
        lines += ["[redis]", f'url = "redis+unix://{redis_sock}"']
    for bid, addr in backends:
        lines += ["[[backend]]", f'id = "{bid}"', f'address = "{addr}"']
    path = work / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def nofile_limit():
    import resource
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def haproxy_conf(work, name, port, backends, tls_port):
    servers = "\n".join(f"    server {bid} {addr}" for bid, addr in backends)
    path = work / f"{name}.cfg"
    path.write_text(f"""global
    nbthread 1
    maxconn {(nofile_limit() - 200) // 2}
    log stderr format raw local0 emerg

defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
    option http-keep-alive

frontend fe
    bind 127.0.0.1:{port}
    bind 127.0.0.1:{tls_port} ssl crt {tls_cert(work)[2]} alpn h2,http/1.1 ssl-min-ver TLSv1.2
    default_backend be

backend be
    balance leastconn
    stick-table type string len 64 size 10m expire 24h
    stick on req.cook(sid)
{servers}
""")
    return path


def nginx_conf(work, name, port, backends, tls_port):
    cert, key, _ = tls_cert(work)
    servers = "\n".join(f"        server {addr};" for _, addr in backends)
    (work / "nginx").mkdir(exist_ok=True)
    path = work / f"{name}.conf"
    path.write_text(f"""worker_processes 1;
worker_rlimit_nofile {nofile_limit()};
pid {work}/{name}.pid;
error_log {work}/{name}-error.log warn;
events {{ worker_connections {nofile_limit() - 200}; }}
http {{
    access_log off;
    client_body_temp_path {work}/nginx;
    proxy_temp_path {work}/nginx;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
    upstream be {{
        hash $cookie_sid consistent;
{servers}
        keepalive 128;
    }}
    # NGINX closes a keep-alive (or HTTP/2) connection after 1,000 requests by default; h2load
    # counts the streams in flight then as errors. The other proxies have no such limit.
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        listen 127.0.0.1:{tls_port} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://be;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_read_timeout 3600s;
        }}
    }}
}}
""")
    return path


# --- wrk -------------------------------------------------------------------------------------

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def parse_ms(text):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    return float(m.group(1)) * UNITS[m.group(2)]


def wrk(port, script, secs, args=(), conns=64, scheme="http"):
    cmd = pinned("load", ["wrk", "-t1", f"-c{conns}", f"-d{secs}s", "--latency", "-s", str(script),
           f"{scheme}://127.0.0.1:{port}/", "--", *args])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    r = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
    r["requests"] = int(re.search(r"(\d+) requests in", out).group(1))
    for pct in ("50", "99"):
        r[f"p{pct}_ms"] = parse_ms(re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M).group(1))
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    r["errors"] = errors
    return r


def h2load(port, secs, clients=100, streams=10):
    """h2load over TLS (ALPN h2), `clients` connections with `streams` concurrent streams each,
    for `secs` seconds after a 1 s warm-up; every request with one session cookie."""
    cmd = pinned("load", ["h2load", f"-c{clients}", f"-m{streams}", "-t1", f"-D{secs}",
                          "--warm-up-time=1", "-H", "cookie: sid=h2load",
                          f"https://127.0.0.1:{port}/"])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored", out)
    r = {"rps": float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1)),
         "requests": int(m.group(4)), "errors": int(m.group(5)) + int(m.group(6))}
    # "time for request:  min  max  mean  sd  +/- sd"
    t = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)
    r["mean_ms"] = parse_ms(t.group(3))
    r["max_ms"] = parse_ms(t.group(2))
    st = re.search(r"status codes: (\d+) 2xx", out)
    r["errors"] += r["requests"] - int(st.group(1))
    return r


# --- the run ---------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="directory with tether, rideshare, tether-bench")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--secs", type=int, default=10, help="seconds per measured run")
    ap.add_argument("--only", default="s1,s2,s3,s4,s5,s6,s7,s8")
    ap.add_argument("--targets", default="direct,tether,tether-noaff,haproxy,nginx",
                    help="which targets to measure, in this order")
    ap.add_argument("--idle-conns", type=int, default=10000)
    ap.add_argument("--out", default=str(HERE / "results.md"))
    ap.add_argument("--json", default=None, help="also write every raw figure here")
    ap.add_argument("--pin", action="store_true",
                    help="the proxy alone on CPU 1, everything else on CPU 0 (see PIN)")
    a = ap.parse_args()
    if a.pin and (os.cpu_count() or 1) >= 2:
        PIN["proxy"], PIN["load"] = 1, 0
    # A proxy holds two descriptors per WebSocket (client and backend side).
    most = (nofile_limit() - 2000) // 2
    if a.idle_conns > most:
        say(f"s4: this machine allows {nofile_limit()} open files per process (ulimit -Hn), so a "
            f"proxy can hold at most ~{most} WebSockets: running s4 with {most}, not {a.idle_conns}")
        a.idle_conns = most
    scenarios = set(a.only.split(","))
    bindir = Path(a.bin)
    tool = str(bindir / "tether-bench")

    work = Path(tempfile.mkdtemp(prefix="tether-bench-"))
    procs = Procs(work)
    raw = {"machine": machine(), "rounds": a.rounds, "secs": a.secs, "runs": []}
    try:
        # Redis (tether's map, rideshare's sessions and broadcasts).
        redis_sock = work / "redis.sock"
        rp = procs.start("redis", pinned("load", ["redis-server", "--port", "0", "--unixsocket", str(redis_sock),
                                   "--save", "", "--appendonly", "no", "--dir", str(work)]))
        deadline = time.time() + 10
        while not redis_sock.exists():
            if time.time() > deadline or rp.poll() is not None:
                raise SystemExit("redis-server did not start")
            time.sleep(0.05)
        redis = Redis(redis_sock)

        # Backends: one process, one thread.
        bports = [free_port() for _ in range(3)]
        backends = [(f"b{i + 1}", f"127.0.0.1:{p}") for i, p in enumerate(bports)]
        bp = procs.start("backends", pinned("load", [tool, "backends",
                                                     *[f"{b}={addr}" for b, addr in backends]]))
        for p in bports:
            wait_port(p, bp, "backends")

        tls_ports = {}  # proxy name -> its TLS port

        def start_target(name, tag=""):
            """Start proxy `name` (the `tag` names a fresh instance); returns (port, [pids], procs)."""
            port, label = free_port(), name + tag
            tls_port = tls_ports.setdefault(label, free_port())
            if name == "direct":
                p = procs.start(label, pinned("load", [tool, "backends", f"d=127.0.0.1:{port}"]))
                wait_port(port, p, label)
                return port, [p.pid], [p]
            if name in ("tether", "tether-noaff"):
                sticky = name == "tether"
                p = start_tether(procs, work, bindir, label, port, backends,
                                 ["cookie:sid"] if sticky else [], redis_sock if sticky else None,
                                 tls_port)
                return port, [p.pid], [p]
            if name == "haproxy":
                p = procs.start(label, pinned("proxy", ["haproxy", "-db", "-f",
                                                        str(haproxy_conf(work, label, port, backends, tls_port))]))
                wait_port(port, p, label)
                return port, [p.pid], [p]
            if name == "nginx":
                p = procs.start(label, pinned("proxy", ["nginx", "-c", str(nginx_conf(work, label, port, backends, tls_port)),
                                                        "-p", str(work), "-g", "daemon off;"]))
                wait_port(port, p, label)
                deadline = time.time() + 5
                while not children(p.pid) and time.time() < deadline:
                    time.sleep(0.05)  # the worker is forked after the master listens
                return port, [p.pid, *children(p.pid)], [p]
            raise SystemExit(f"unknown target {name}")

        targets = {}  # name -> (port, [pids] or None)
        targets["direct"] = (bports[0], None)
        for name in ("tether", "tether-noaff", "haproxy", "nginx"):
            port, pids, _ = start_target(name)
            targets[name] = (port, pids)

        order = [t for t in a.targets.split(",") if t]
        unknown = [t for t in order if t not in targets]
        if unknown:
            raise SystemExit(f"unknown targets {unknown}: choose among {list(targets)}")
        say(f"work dir {work}; targets: " + ", ".join(f"{n}=:{targets[n][0]}" for n in order))
        results = {}

        def record(scn, rnd, name, out):
            say(f"{scn} round {rnd + 1} {name}: {fmt_run(out)}")
            results.setdefault(scn, {}).setdefault(name, []).append({"round": rnd, **out})
            raw["runs"].append({"scenario": scn, "round": rnd, "target": name, **out})

        def http_round(scn, rnd, script, argsf, tls=False):
            for name in rotated(order, rnd):
                port, pids = targets[name]
                if tls:
                    if name not in tls_ports:
                        continue  # direct: the backends speak no TLS
                    port = tls_ports[name]
                scheme = "https" if tls else "http"
                # Warm-up (also pins s1's sessions): not measured.
                wrk(port, script, 2, argsf(name, rnd, "warm"), scheme=scheme)
                c0 = cpu_secs(pids) if pids else None
                r0 = redis.commands_processed() if name == "tether" else None
                t0 = machine_ticks()
                r = wrk(port, script, a.secs, argsf(name, rnd, "run"), scheme=scheme)
                r["steal_pct"] = host_share(t0)
                if pids:
                    r["cpu_us_per_req"] = (cpu_secs(pids) - c0) * 1e6 / max(1, r["requests"])
                if r0 is not None:
                    # The first INFO is counted by the second: subtract it.
                    r1 = redis.commands_processed()
                    r["redis_cmds_per_req"] = max(0, r1 - r0 - 1) / max(1, r["requests"])
                record(scn, rnd, name, r)

        # s1 and s2 alternate round by round, so that the s2/s1 ratio of each round compares runs
        # minutes apart rather than a whole scenario apart: on a shared 2-core machine one
        # binary's rate drifts 20% over ten minutes.
        for rnd in range(a.rounds):
            if "s1" in scenarios:
                http_round("s1", rnd, HERE / "sessions.lua", lambda n, r, w: ["1000"])
            if "s2" in scenarios:
                http_round("s2", rnd, HERE / "new_sessions.lua",
                           lambda n, r, w: [f"{n}-{r}-{w}-{os.getpid()}"])

        # TLS: s6 and s7 alternate like s1 and s2; s8 after them.
        for rnd in range(a.rounds):
            if "s6" in scenarios:
                http_round("s6", rnd, HERE / "sessions.lua", lambda n, r, w: ["1000"], tls=True)
            if "s7" in scenarios:
                http_round("s7", rnd, HERE / "sessions.lua", lambda n, r, w: ["1000", "close"],
                           tls=True)
        if "s8" in scenarios:
            for rnd in range(a.rounds):
                for name in rotated(order, rnd):
                    if name not in tls_ports:
                        continue
                    port, pids = tls_ports[name], targets[name][1]
                    c0 = cpu_secs(pids)
                    t0 = machine_ticks()
                    r = h2load(port, a.secs)
                    r["steal_pct"] = host_share(t0)
                    # The warm-up second is in the CPU window: counted against its requests too.
                    r["cpu_us_per_req"] = (cpu_secs(pids) - c0) * 1e6 / max(1, r["requests"])
                    record("s8", rnd, name, r)

        if "s3" in scenarios:
            for rnd in range(a.rounds):
                for name in rotated(order, rnd):
                    port, pids = targets[name]
                    c0 = cpu_secs(pids) if pids else None
                    t0 = machine_ticks()
                    out = run_json(pinned("load", [tool, "ws-echo", "--target", f"127.0.0.1:{port}",
                                    "--conns", "1000", "--secs", str(a.secs)]))
                    out["steal_pct"] = host_share(t0)
                    if pids:
                        out["cpu_us_per_msg"] = (cpu_secs(pids) - c0) * 1e6 / max(1, out["messages"])
                    record("s3", rnd, name, out)

        if "s4" in scenarios:
            # A fresh process per run: a process that served the other scenarios (or an earlier
            # round) reuses memory it already holds, and its growth says little.
            for rnd in range(a.rounds):
                for name in rotated(order, rnd):
                    port, pids, fresh = start_target(name, f"-s4-{rnd}")
                    out = run_json(pinned("load", [tool, "ws-idle", "--target", f"127.0.0.1:{port}",
                                                   "--conns", str(a.idle_conns),
                                                   "--pids", ",".join(map(str, pids))]))
                    procs.stop(fresh)
                    out["before_mib"] = out["rss_before_bytes"] / 2**20
                    out["held_mib"] = out["rss_held_bytes"] / 2**20
                    record("s4", rnd, name, out)

        if "s5" in scenarios:
            sio_port, rs_ports = start_rideshare_stack(procs, work, bindir, redis_sock)
            # direct: the same clients on one rideshare instance, no proxy: what the load tool
            # and rideshare take on this machine by themselves.
            for rnd in range(a.rounds):
                for name, port in rotated((("direct", rs_ports[0]), ("tether", sio_port)), rnd):
                    t0 = machine_ticks()
                    out = run_json([tool, "sio-fanout", "--target", f"127.0.0.1:{port}",
                                    "--clients", "1000", "--emits", str(10 * a.secs), "--rate", "10",
                                    "--prefix", f"r{rnd}-{name}-{os.getpid()}"])
                    out["steal_pct"] = host_share(t0)
                    record("s5", rnd, name, out)

        report = render(results, order, raw["machine"], a)
        print(report)
        Path(a.out).write_text(report)
        say(f"wrote {a.out}")
        if a.json:
            Path(a.json).write_text(json.dumps(raw, indent=1))
    finally:
        procs.stop_all()


def start_tether(procs, work, bindir, label, port, backends, sources, redis_sock, tls_port=None):
    """tether (`sources`, Redis when given) on `port` (and TLS on `tls_port`) in front of
    `backends`; returns its process."""
    conf = tether_conf(work, label, port, free_port(), backends, sources, redis_sock, tls_port)
    p = procs.start(label, pinned("proxy", [str(bindir / "tether"), "run", "-c", str(conf)]),
                    env={**os.environ, "RUST_LOG": "warn"})
    wait_port(port, p, label)
    return p


def start_rideshare_stack(procs, work, bindir, redis_sock):
    ports = [free_port() for _ in range(3)]
    for i, p in enumerate(ports):
        rp = procs.start(f"rideshare-{i + 1}", [
            str(bindir / "rideshare"), "--id", f"rs{i + 1}", "--listen", f"127.0.0.1:{p}",
            "--redis", f"redis+unix://{redis_sock}", "--session-secret", "bench only, not a secret"],
            env={**os.environ, "RUST_LOG": "warn"})
        wait_port(p, rp, f"rideshare-{i + 1}")
    port = free_port()
    start_tether(procs, work, bindir, "tether-sio", port,
                 [(f"rs{i + 1}", f"127.0.0.1:{p}") for i, p in enumerate(ports)],
                 ["cookie:rs.sid", "query:sid"], redis_sock)
    return port, ports


def run_json(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt_run(r):
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items())


def rotated(order, rnd):
    """`order` started `rnd` places later: each round measures the targets in a different order,
    so no target always runs first after the warm-up, or right after `direct` (the heaviest run),
    or last in a round."""
    order = list(order)
    k = rnd % len(order)
    return order[k:] + order[:k]


def machine():
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    versions = {}
    for name, cmd in [("haproxy", ["haproxy", "-v"]), ("nginx", ["nginx", "-v"]),
                      ("wrk", ["wrk", "-v"]), ("redis", ["redis-server", "--version"])]:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True)
            versions[name] = (p.stdout + p.stderr).strip().splitlines()[0]
        except OSError:
            versions[name] = "not found"
    return {"cpu": cpu, "cores": os.cpu_count(), "versions": versions}


# --- report ----------------------------------------------------------------------------------

def med(runs, key):
    vals = [r[key] for r in runs if key in r and r[key] == r[key]]
    if not vals:
        return None
    return statistics.median(vals), min(vals), max(vals)


def cell(runs, key, digits=1):
    m = med(runs, key)
    if m is None:
        return "-"
    fmtv = (lambda v: f"{v:,.0f}") if digits == 0 else (lambda v: f"{v:,.{digits}f}")
    return f"{fmtv(m[0])} ({fmtv(m[1])}-{fmtv(m[2])})"


def ratio(results, name, key):
    base = med(results.get("direct", []), key)
    m = med(results.get(name, []), key)
    if not base or not m or not base[0]:
        return "-"
    return f"{m[0] / base[0]:.2f}"


def table(title, r, order, cols, direct_label="direct"):
    """One markdown table: a row per target, a column per (header, key, digits); digits None is
    the ratio to `direct`, "sum"/"min" aggregate the runs instead of a median (min-max)."""
    out = [f"## {title}", "", "| target | " + " | ".join(h for h, _, _ in cols) + " |",
           "|---" * (len(cols) + 1) + "|"]
    for n in order:
        runs = r.get(n, [])
        cells = []
        for _, key, digits in cols:
            if digits is None:
                cells.append(ratio(r, n, key))
            elif digits in ("sum", "min"):
                vals = [x[key] for x in runs]
                cells.append(str((sum if digits == "sum" else min)(vals)) if vals else "-")
            else:
                cells.append(cell(runs, key, digits))
        out.append(f"| {direct_label if n == 'direct' else n} | " + " | ".join(cells) + " |")
    return out + [""]


def render(results, order, mach, a):
    out = ["# tether benchmark", "",
           f"{mach['cpu']}, {mach['cores']} cores; {', '.join(mach['versions'].values())}. "
           f"Medians of {a.rounds} interleaved rounds (min-max), {a.secs} s per run, one worker per "
           "proxy, wrk -t1 -c64. "
           + ("The proxy under test runs alone on CPU 1; wrk, the load tool, the backends and Redis "
              "share CPU 0 (so `direct` is wrk and a backend on one core). " if PIN["proxy"] is not None
              else "Processes not pinned to cores. ")
           + "Each round measures the targets in a different order (rotated by one). `host steal %`: "
           "the share of the machine's CPU time the hypervisor took while that target ran "
           "(/proc/stat); a round it took much from is slower for a reason the other targets did "
           "not share. `tests/bench/run.sh` reproduces it.", ""]
    http_cols = [("req/s", "rps", 0), ("x direct", "rps", None), ("p50 ms", "p50_ms", 2),
                 ("p99 ms", "p99_ms", 2), ("proxy CPU us/req", "cpu_us_per_req", 1),
                 ("Redis cmds/req", "redis_cmds_per_req", 3), ("host steal %", "steal_pct", 1),
                 ("errors", "errors", "sum")]
    for scn, title, cols, direct_label in [
        ("s1", "1. keep-alive GETs, 1,000 pinned sessions", http_cols, "direct"),
        ("s2", "2. every request a new session", http_cols, "direct"),
        ("s3", "3. WebSocket echo, 1,000 connections, 32-byte messages",
         [("msgs/s", "msgs_per_sec", 0), ("x direct", "msgs_per_sec", None), ("p50 ms", "p50_ms", 2),
          ("p99 ms", "p99_ms", 2), ("proxy CPU us/msg", "cpu_us_per_msg", 1),
          ("host steal %", "steal_pct", 1), ("errors", "errors", "sum")],
         "direct"),
        ("s6", "6. keep-alive GETs over TLS 1.3, 1,000 pinned sessions", http_cols, "direct"),
        ("s7", "7. a new TLS connection per request (full handshake, `Connection: close`)",
         http_cols, "direct"),
        ("s8", "8. HTTP/2 over TLS, h2load 100 clients x 10 streams (proxy CPU includes h2load's "
         "1 s warm-up)",
         [("req/s", "rps", 0), ("mean ms", "mean_ms", 2), ("max ms", "max_ms", 1),
          ("proxy CPU us/req", "cpu_us_per_req", 1), ("host steal %", "steal_pct", 1),
          ("errors", "errors", "sum")], "direct"),
        ("s4", f"4. {a.idle_conns:,} idle WebSockets",
         [("RSS before MiB", "before_mib", 1), ("RSS held MiB", "held_mib", 1),
          ("bytes per connection", "bytes_per_conn", 0), ("alive after", "alive_after", "min")],
         "direct (a backend's own RSS)"),
    ]:
        if scn in results:
            out += table(title, results[scn], order, cols, direct_label)
    if "s5" in results:
        out += ["## 5. Socket.IO fan-out through tether, 1,000 clients on three rideshare instances", "",
                "`direct`: the same 1,000 clients and driver on one rideshare instance, no proxy (the "
                "load tool's and rideshare's own share of the latency on this machine).", "",
                "| target | emits | p50 ms | p99 ms | max ms | lost of expected |",
                "|---|---|---|---|---|---|"]
        labels = {"direct": "direct (one rideshare instance)", "tether": "tether (three instances)"}
        for name in ("direct", "tether"):
            runs = results["s5"].get(name)
            if not runs:
                continue
            out.append(f"| {labels[name]} | {runs[0]['emits']} x {len(runs)} | {cell(runs, 'p50_ms', 2)} | "
                       f"{cell(runs, 'p99_ms', 2)} | {cell(runs, 'max_ms', 1)} | "
                       f"{sum(x['lost'] for x in runs)} of {sum(x['expected'] for x in runs)} |")
        out.append("")
    out += targets_table(results)
    return "\n".join(out)


def per_round(results, scn, name, key):
    """`key` of `name`'s runs in `scn`, by round."""
    return {r["round"]: r[key] for r in results.get(scn, {}).get(name, []) if key in r}


def targets_table(results):
    """Issue 6's targets, each judged on this run's medians (a row only where its targets ran),
    with the same comparison per round: the spread says how much one run can be trusted."""
    rows = []

    def check(what, wanted, scn, key, other, factor, fmt, op=">="):
        """tether's median of `key` in `scn` `op` `factor` x the median of `other` (scenario,
        target), or `op` `factor` itself when there is no other."""
        mine = med(results.get(scn, {}).get("tether", []), key)
        theirs = med(results.get(other[0], {}).get(other[1], []), key) if other else None
        if mine is None or (other and theirs is None):
            return
        bound = theirs[0] * factor if other else factor
        held = {">=": mine[0] >= bound, "<=": mine[0] <= bound, "<": mine[0] < bound}[op]
        lower_is_better = op != ">="
        if other and not lower_is_better:
            got = f"{fmt(mine[0])} / {fmt(theirs[0])} = {mine[0] / theirs[0]:.2f}x"
        elif other:
            got = f"{fmt(mine[0])} against {fmt(theirs[0])}"
        else:
            got = fmt(mine[0])
        a = per_round(results, scn, "tether", key)
        if not other:
            rounds = ", ".join(fmt(a[r]) for r in sorted(a))
        else:
            b = per_round(results, other[0], other[1], key)
            both = sorted(set(a) & set(b))
            if not lower_is_better:
                rounds = ", ".join(f"{a[r] / b[r]:.2f}x" for r in both)
            else:
                rounds = ", ".join(f"{a[r]:.2f}/{b[r]:.2f}" for r in both)
        steal = per_round(results, scn, "tether", "steal_pct")
        steal = ", ".join(f"{steal[r]:.1f}" for r in sorted(steal)) or "-"
        rows.append(f"| {what} | {wanted} | {got} | {rounds} | {steal} | {'yes' if held else 'no'} |")

    rps = lambda v: f"{v:,.0f}"
    ms = lambda v: f"{v:.2f} ms"
    check("s1 req/s", ">= HAProxy", "s1", "rps", ("s1", "haproxy"), 1.0, rps)
    check("s1 req/s", ">= 0.9x affinity off", "s1", "rps", ("s1", "tether-noaff"), 0.9, rps)
    check("s1 p99", "<= NGINX", "s1", "p99_ms", ("s1", "nginx"), 1.0, ms, op="<=")
    check("s1 Redis commands per request", "< 0.01", "s1", "redis_cmds_per_req", None, 0.01,
          lambda v: f"{v:.6f}", op="<")
    check("s2 req/s", ">= 0.7x s1", "s2", "rps", ("s1", "tether"), 0.7, rps)
    check("s3 msgs/s", ">= HAProxy", "s3", "msgs_per_sec", ("s3", "haproxy"), 1.0, rps)
    check("s4 bytes per idle WebSocket", "< 20 KiB", "s4", "bytes_per_conn", None, 20 * 1024,
          lambda v: f"{v:,.0f} B", op="<")
    check("s5 p99", "< 50 ms", "s5", "p99_ms", None, 50.0, ms, op="<")
    # Issue 20's targets.
    check("s6 req/s", ">= 1.1x HAProxy", "s6", "rps", ("s6", "haproxy"), 1.1, rps)
    check("s6 req/s", ">= 1.1x NGINX", "s6", "rps", ("s6", "nginx"), 1.1, rps)
    check("s6 p99", "<= NGINX", "s6", "p99_ms", ("s6", "nginx"), 1.0, ms, op="<=")
    check("s7 new TLS connections/s", ">= 0.9x HAProxy", "s7", "rps", ("s7", "haproxy"), 0.9, rps)
    check("s8 HTTP/2 req/s", ">= NGINX", "s8", "rps", ("s8", "nginx"), 1.0, rps)
    if not rows:
        return []
    return (["## Targets (issues 6, 19, 20), on this run's medians", "",
             "| figure | wanted | tether, median | per round | host steal % in tether's runs | held |",
             "|---|---|---|---|---|---|"]
            + rows + [""])


if __name__ == "__main__":
    main()
