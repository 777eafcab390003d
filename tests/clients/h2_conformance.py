#!/usr/bin/env python3
"""HTTP/2 conformance cases for tether's TLS listener, in the spirit of h2spec's "http2" section.

h2spec cannot be installed here, so this script does what it does: it opens one TLS connection per
case (ALPN "h2", the certificate checked against --ca for the name "localhost"), writes raw frames,
many of them invalid in ways a real client library refuses to produce, and checks what comes back
against what RFC 9113 allows (sections numbered as in h2spec, i.e. RFC 7540's; RFC 9113 kept them).

What counts as a pass, as in h2spec:
- connection error X: a GOAWAY with X, or the connection closed (RFC 9113 5.4.1: GOAWAY is a
  SHOULD); 5.4.1 itself insists on the GOAWAY;
- stream error X: RST_STREAM with X, or a GOAWAY with X, or the connection closed (an endpoint may
  always treat a stream error as a connection error, RFC 9113 5.4.2);
- malformed request (8.1.1): a stream error PROTOCOL_ERROR; a response (e.g. a 400) before it is
  fine, as RFC 9113 8.1.1 allows and h2spec ignores it, but a 400 that ends the stream with no
  RST_STREAM is not a stream error and fails, as in h2spec;
- "ignored": the connection still answers a PING afterwards (or the request is served).

Usage: h2_conformance.py --port P --ca FILE [--host 127.0.0.1] [--json] [--timeout 3] [--jobs 8]
Exit code 0 whatever the results (the caller compares the failures with its list), 2 on bad usage
or when the sanity request cannot be served at all.
"""

import argparse
import json
import socket
import ssl
import struct
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import hpack
from hyperframe.frame import (
    DataFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
TYPE_NAMES = {
    0: "DATA", 1: "HEADERS", 2: "PRIORITY", 3: "RST_STREAM", 4: "SETTINGS", 5: "PUSH_PROMISE",
    6: "PING", 7: "GOAWAY", 8: "WINDOW_UPDATE", 9: "CONTINUATION",
}

# Flags.
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

# Error codes.
CODES = {
    0x0: "NO_ERROR", 0x1: "PROTOCOL_ERROR", 0x2: "INTERNAL_ERROR", 0x3: "FLOW_CONTROL_ERROR",
    0x4: "SETTINGS_TIMEOUT", 0x5: "STREAM_CLOSED", 0x6: "FRAME_SIZE_ERROR",
    0x7: "REFUSED_STREAM", 0x8: "CANCEL", 0x9: "COMPRESSION_ERROR", 0xA: "CONNECT_ERROR",
    0xB: "ENHANCE_YOUR_CALM", 0xC: "INADEQUATE_SECURITY", 0xD: "HTTP_1_1_REQUIRED",
}
NAMES = {v: k for k, v in CODES.items()}
PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED = 0x1, 0x3, 0x5
FRAME_SIZE_ERROR, REFUSED_STREAM, COMPRESSION_ERROR = 0x6, 0x7, 0x9

# Settings identifiers.
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE = 0x4, 0x5

OPTS = None  # argparse namespace, set in main()

# A stream window of 0 for the server's responses: the response head can come, its body cannot,
# so a stream the client ended stays half-closed (remote) on the server for as long as the case
# needs (the backends' bodies are never empty).
HOLD_RESPONSE = [(0x4, 0)]


def code_name(code):
    return CODES.get(code, hex(code))


def raw_frame(ftype, flags, sid, payload=b""):
    """Any frame, valid or not: 24-bit length, type, flags, 32-bit stream id (reserved bit
    included, so a caller can set it), payload."""
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


def settings_payload(pairs):
    return b"".join(struct.pack(">HI", k, v) for k, v in pairs)


class Closed(Exception):
    """The server closed the connection (EOF, reset, or a TLS alert)."""


class Frame:
    def __init__(self, ftype, flags, sid, payload):
        self.type, self.flags, self.sid, self.payload = ftype, flags, sid, payload
        self.headers = None  # decoded header list, on the frame that ended a header block

    def code(self):
        """The error code of a RST_STREAM or GOAWAY."""
        if self.type == RST_STREAM and len(self.payload) >= 4:
            return struct.unpack(">I", self.payload[:4])[0]
        if self.type == GOAWAY and len(self.payload) >= 8:
            return struct.unpack(">I", self.payload[4:8])[0]
        return None

    def __str__(self):
        name = TYPE_NAMES.get(self.type, "type 0x%x" % self.type)
        text = "%s(stream %d, flags 0x%x, %d bytes" % (name, self.sid, self.flags, len(self.payload))
        if self.type in (RST_STREAM, GOAWAY) and self.code() is not None:
            text += ", " + code_name(self.code())
            if self.type == GOAWAY and len(self.payload) > 8:
                text += ", %r" % self.payload[8:80].decode("utf-8", "replace")
        if self.headers is not None:
            status = dict(self.headers).get(":status")
            if status:
                text += ", :status " + status
        return text + ")"


class Conn:
    """One TLS connection speaking raw HTTP/2 frames."""

    def __init__(self):
        ctx = ssl.create_default_context(cafile=OPTS.ca)
        ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection((OPTS.host, OPTS.port), timeout=OPTS.timeout)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        alpn = self.sock.selected_alpn_protocol()
        if alpn != "h2":
            raise RuntimeError("ALPN chose %r, not h2" % alpn)
        self.buf = b""
        self.closed = False
        self.write_failed = False
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.block = None  # (first frame, fragments) of a header block being received
        self.server_settings = {}
        self.seen = []  # every frame received, as text, for the report
        self.bodies = {}  # stream id -> the DATA received on it

    # -- writing --

    def send(self, data):
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError):
            # The server may already have closed after an error; what it sent is still read.
            self.write_failed = True

    def send_frame(self, frame):
        self.send(frame.serialize())

    def header_block(self, headers):
        return self.encoder.encode(headers)

    def send_headers(self, sid, headers, end_stream=True, end_headers=True):
        f = HeadersFrame(sid)
        f.data = self.header_block(headers)
        f.flags.add("END_HEADERS") if end_headers else None
        f.flags.add("END_STREAM") if end_stream else None
        self.send_frame(f)

    def send_data(self, sid, data, end_stream=True):
        f = DataFrame(sid)
        f.data = data
        if end_stream:
            f.flags.add("END_STREAM")
        self.send_frame(f)

    def send_settings(self, pairs=()):
        f = SettingsFrame(0)
        f.settings = dict(pairs)
        if len(f.settings) != len(pairs):  # several values of one setting: hyperframe keeps one
            self.send(raw_frame(SETTINGS, 0, 0, settings_payload(pairs)))
        else:
            self.send_frame(f)

    def send_ping(self, data, ack=False):
        f = PingFrame(0)
        f.opaque_data = data
        if ack:
            f.flags.add("ACK")
        self.send_frame(f)

    def send_window_update(self, sid, increment):
        f = WindowUpdateFrame(sid)
        f.window_increment = increment
        self.send_frame(f)

    def send_rst(self, sid, code):
        f = RstStreamFrame(sid)
        f.error_code = code
        self.send_frame(f)

    # -- reading --

    def _fill(self, n, deadline):
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                raise TimeoutError
            except (OSError, ssl.SSLError) as e:
                self.closed = True
                raise Closed(str(e) or type(e).__name__)
            if not chunk:
                self.closed = True
                raise Closed("EOF")
            self.buf += chunk

    def read_frame(self, deadline):
        """The next frame, decoding header blocks as they complete (so that the HPACK table stays
        in step). Raises TimeoutError at the deadline, Closed when the server has gone."""
        if self.closed:
            raise Closed("already closed")
        self._fill(9, deadline)
        length = struct.unpack(">I", b"\0" + self.buf[:3])[0]
        self._fill(9 + length, deadline)
        ftype, flags = self.buf[3], self.buf[4]
        sid = struct.unpack(">I", self.buf[5:9])[0] & 0x7FFFFFFF
        payload = self.buf[9:9 + length]
        self.buf = self.buf[9 + length:]
        frame = Frame(ftype, flags, sid, payload)
        if ftype in (HEADERS, PUSH_PROMISE):
            frag = payload
            if flags & PADDED:
                frag = frag[1:len(frag) - frag[0]]
            if ftype == HEADERS and flags & PRIORITY_FLAG:
                frag = frag[5:]
            if ftype == PUSH_PROMISE:
                frag = frag[4:]
            self.block = [frag]
            if flags & END_HEADERS:
                self._decode(frame)
        elif ftype == CONTINUATION and self.block is not None:
            self.block.append(payload)
            if flags & END_HEADERS:
                self._decode(frame)
        elif ftype == DATA:
            body = payload[1:len(payload) - payload[0]] if flags & PADDED and payload else payload
            self.bodies[sid] = self.bodies.get(sid, b"") + body
        elif ftype == SETTINGS and not flags & ACK:
            for i in range(0, len(payload) - len(payload) % 6, 6):
                k, v = struct.unpack(">HI", payload[i:i + 6])
                self.server_settings[k] = v
        self.seen.append(str(frame))
        return frame

    def _decode(self, frame):
        block = b"".join(self.block)
        self.block = None
        try:
            frame.headers = [(k.decode() if isinstance(k, bytes) else k,
                              v.decode() if isinstance(v, bytes) else v)
                             for k, v in self.decoder.decode(block)]
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            frame.headers = [("x-decode-error", repr(e))]

    def frames(self, timeout=None):
        """Frames until the deadline; ends (without raising) on a timeout or a close, leaving
        self.closed set for the latter."""
        deadline = time.monotonic() + (timeout if timeout is not None else OPTS.timeout)
        while True:
            try:
                yield self.read_frame(deadline)
            except (TimeoutError, Closed):
                return

    def handshake(self, settings=()):
        """Preface and our SETTINGS; waits for the server's SETTINGS (answered with an ACK) and
        for the ACK of ours."""
        self.send(PREFACE)
        self.send_settings(settings)
        got_settings = got_ack = False
        for f in self.frames():
            if f.type == SETTINGS and f.flags & ACK:
                got_ack = True
            elif f.type == SETTINGS:
                got_settings = True
                self.send(raw_frame(SETTINGS, ACK, 0))
            if got_settings and got_ack:
                return
        raise RuntimeError("handshake incomplete (server SETTINGS %s, ACK %s; saw %s)"
                           % (got_settings, got_ack, self.seen))

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def request_headers(path, method="GET", extra=()):
    return [(":method", method), (":scheme", "https"), (":path", path),
            (":authority", "localhost")] + list(extra)


# ---------------------------------------------------------------------------------------------
# Verdicts: each returns (passed, what was seen)
# ---------------------------------------------------------------------------------------------

def seen(conn, tail=6):
    text = ", ".join(conn.seen[-tail:]) if conn.seen else "no frames"
    if conn.closed:
        text += ", then the connection closed"
    return text


def connection_error(conn, *codes, need_goaway=False):
    """GOAWAY with one of `codes`, or (unless need_goaway) the connection closed."""
    for f in conn.frames():
        if f.type == GOAWAY:
            return f.code() in codes, "GOAWAY %s" % code_name(f.code())
    if conn.closed and not need_goaway:
        return True, "connection closed without GOAWAY (" + seen(conn) + ")"
    return False, ("closed without GOAWAY: " if conn.closed else "no GOAWAY within the deadline: ") + seen(conn)


def stream_error(conn, sid, *codes):
    """RST_STREAM on `sid` or a GOAWAY, with one of `codes`; or the connection closed."""
    for f in conn.frames():
        if f.type == GOAWAY:
            return f.code() in codes, "GOAWAY %s" % code_name(f.code())
        if f.type == RST_STREAM and f.sid == sid:
            return f.code() in codes, "RST_STREAM %s" % code_name(f.code())
    if conn.closed:
        return True, "connection closed (" + seen(conn) + ")"
    return False, "neither RST_STREAM nor GOAWAY within the deadline: " + seen(conn)


def malformed(conn, sid):
    """A malformed request (RFC 9113 8.1.1): stream error PROTOCOL_ERROR, a response before it
    allowed."""
    ok, what = stream_error(conn, sid, PROTOCOL_ERROR)
    statuses = [s for s in conn.seen if ":status" in s and "stream %d," % sid in s]
    if statuses:
        what = "response %s, then %s" % (statuses[0].split(":status ")[1].rstrip(")"), what)
    return ok, what


def ping_alive(conn, data=b"h2c-live"):
    """The connection still works: a PING is answered with the same payload."""
    conn.send_ping(data)
    for f in conn.frames():
        if f.type == PING and f.flags & ACK:
            if f.payload == data:
                return True, "PING answered"
            return False, "PING ACK with another payload %r" % f.payload
        if f.type == GOAWAY:
            return False, "GOAWAY %s" % code_name(f.code())
    return False, ("connection closed: " if conn.closed else "no PING ACK: ") + seen(conn)


def response(conn, sid, status=None):
    """A response on `sid` that ends the stream; `status` if given."""
    got = None
    for f in conn.frames():
        if f.type == GOAWAY:
            return False, "GOAWAY %s" % code_name(f.code())
        if f.sid != sid:
            continue
        if f.type == RST_STREAM:
            return False, "RST_STREAM %s" % code_name(f.code())
        if f.headers is not None and got is None:
            got = dict(f.headers).get(":status")
        if f.type in (HEADERS, DATA) and f.flags & END_STREAM:
            if got is None:
                return False, "stream ended without a response"
            if status is not None and got != str(status):
                return False, "response %s" % got
            return True, "response %s" % got
    return False, ("connection closed: " if conn.closed else "no complete response: ") + seen(conn)


def data_of_length(conn, sid, length):
    """A DATA frame on `sid` of exactly `length` bytes (the server respected a small window)."""
    for f in conn.frames():
        if f.type == GOAWAY:
            return False, "GOAWAY %s" % code_name(f.code())
        if f.type == RST_STREAM and f.sid == sid:
            return False, "RST_STREAM %s" % code_name(f.code())
        if f.type == DATA and f.sid == sid and f.payload:
            return len(f.payload) == length, "DATA of %d bytes" % len(f.payload)
    return False, ("connection closed: " if conn.closed else "no DATA: ") + seen(conn)


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

CASES = []


def case(section, description, malformed_request=False, handshake=True, settings=(), alone=False):
    """Registers a case; the function gets (conn, path) and returns (passed, seen). `path` is
    unique to the case, so the caller can tell whether a request reached a backend. `alone`: run
    after the others, by itself (it loads the backends)."""
    def register(fn):
        CASES.append(dict(section=section, description=description, fn=fn,
                          malformed=malformed_request, handshake=handshake, settings=settings, alone=alone,
                          id="%s/%d" % (section, sum(c["section"] == section for c in CASES) + 1)))
        return fn
    return register


def post(conn, sid, path, extra=()):
    conn.send_headers(sid, request_headers(path, "POST", extra), end_stream=False)


# 3.5 HTTP/2 Connection Preface

@case("3.5", "sends the client connection preface: the server answers with SETTINGS")
def _(conn, path):
    conn.send_headers(1, request_headers(path))
    return response(conn, 1, 200)


@case("3.5", "sends an invalid connection preface -> connection error", handshake=False)
def _(conn, path):
    conn.send(b"INVALID CONNECTION PREFACE\r\n\r\n")
    return connection_error(conn, PROTOCOL_ERROR)


@case("3.5", "sends an HTTP/1.1 request after ALPN h2 -> connection error", handshake=False)
def _(conn, path):
    conn.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    return connection_error(conn, PROTOCOL_ERROR)


# 4.1 Frame Format

@case("4.1", "sends a frame with an unknown type: ignored")
def _(conn, path):
    conn.send(raw_frame(0x16, 0, 0, b"\0" * 8))
    return ping_alive(conn)


@case("4.1", "sends a frame with undefined flags: ignored")
def _(conn, path):
    conn.send(raw_frame(PING, 0x16, 0, b"h2c-flag"))
    for f in conn.frames():
        if f.type == PING and f.flags & ACK:
            return f.payload == b"h2c-flag", "PING ACK %r" % f.payload
        if f.type == GOAWAY:
            return False, "GOAWAY %s" % code_name(f.code())
    return False, seen(conn)


@case("4.1", "sends a frame with the reserved bit set in the stream id: ignored")
def _(conn, path):
    conn.send(raw_frame(HEADERS, END_STREAM | END_HEADERS, 0x80000001,
                        conn.header_block(request_headers(path))))
    return response(conn, 1, 200)


# 4.2 Frame Size

@case("4.2", "sends a DATA frame of 2^14 octets: processed")
def _(conn, path):
    post(conn, 1, path, [("content-length", "16384")])
    conn.send_data(1, b"x" * 16384)
    return response(conn, 1, 200)


@case("4.2", "sends a DATA frame larger than SETTINGS_MAX_FRAME_SIZE -> FRAME_SIZE_ERROR")
def _(conn, path):
    post(conn, 1, path)
    size = conn.server_settings.get(MAX_FRAME_SIZE, 16384) + 1
    conn.send(raw_frame(DATA, END_STREAM, 1, b"x" * size))
    return stream_error(conn, 1, FRAME_SIZE_ERROR)


@case("4.2", "sends a HEADERS frame larger than SETTINGS_MAX_FRAME_SIZE -> FRAME_SIZE_ERROR")
def _(conn, path):
    size = conn.server_settings.get(MAX_FRAME_SIZE, 16384) + 1
    block = conn.encoder.encode(request_headers(path, extra=[("x-big", "x" * size)]), huffman=False)
    conn.send(raw_frame(HEADERS, END_STREAM | END_HEADERS, 1, block))
    return connection_error(conn, FRAME_SIZE_ERROR)


@case("4.2", "sends a PING frame larger than SETTINGS_MAX_FRAME_SIZE -> FRAME_SIZE_ERROR")
def _(conn, path):
    size = conn.server_settings.get(MAX_FRAME_SIZE, 16384) + 1
    conn.send(raw_frame(PING, 0, 0, b"x" * size))
    return connection_error(conn, FRAME_SIZE_ERROR)


# 4.3 Header Compression

@case("4.3", "sends an invalid header block fragment -> COMPRESSION_ERROR")
def _(conn, path):
    # A literal with incremental indexing, new name, whose length (0x7f, varint) runs off the end.
    conn.send(raw_frame(HEADERS, END_STREAM | END_HEADERS, 1, b"\x00\x85\xf2\xb2\x4a\x87\xff\xff\xff\xfd\x25\x42\x7f"))
    return connection_error(conn, COMPRESSION_ERROR)


@case("4.3", "sends a header block referencing a dynamic table index that does not exist -> COMPRESSION_ERROR")
def _(conn, path):
    conn.send(raw_frame(HEADERS, END_STREAM | END_HEADERS, 1, b"\x82\x87\x84\xff\x80\x01"))
    return connection_error(conn, COMPRESSION_ERROR)


@case("4.3", "sends a dynamic table size update larger than SETTINGS_HEADER_TABLE_SIZE -> COMPRESSION_ERROR")
def _(conn, path):
    # 3f e2 1f: a size update to 31 + 0x62 + (0x1f << 7) = 4097, above the 4096 allowed.
    conn.send(raw_frame(HEADERS, END_STREAM | END_HEADERS, 1,
                        b"\x3f\xe2\x1f\x82\x87\x84\x41\x09localhost"))
    return connection_error(conn, COMPRESSION_ERROR)


@case("4.3", "sends a PRIORITY frame in the middle of a header block -> PROTOCOL_ERROR")
def _(conn, path):
    block = conn.header_block(request_headers(path))
    conn.send(raw_frame(HEADERS, END_STREAM, 1, block[:3]))
    conn.send(raw_frame(PRIORITY, 0, 3, b"\0\0\0\0\x10"))
    conn.send(raw_frame(CONTINUATION, END_HEADERS, 1, block[3:]))
    return connection_error(conn, PROTOCOL_ERROR)


@case("4.3", "sends a HEADERS frame for another stream in the middle of a header block -> PROTOCOL_ERROR")
def _(conn, path):
    block = conn.header_block(request_headers(path))
    conn.send(raw_frame(HEADERS, END_STREAM, 1, block))
    conn.send(raw_frame(HEADERS, END_STREAM | END_HEADERS, 3, block))
    return connection_error(conn, PROTOCOL_ERROR)


# 5.1 Stream States

@case("5.1", "idle: sends a DATA frame -> PROTOCOL_ERROR")
def _(conn, path):
    conn.send(raw_frame(DATA, END_STREAM, 1, b"test"))
    return connection_error(conn, PROTOCOL_ERROR)


@case("5.1", "idle: sends a RST_STREAM frame -> PROTOCOL_ERROR")
def _(conn, path):
    conn.send_rst(1, 0x8)
    return connection_error(conn, PROTOCOL_ERROR)


@case("5.1", "idle: sends a WINDOW_UPDATE frame -> PROTOCOL_ERROR")
def _(conn, path):
    conn.send_window_update(1, 100)
    return connection_error(conn, PROTOCOL_ERROR)


@case("5.1", "idle: sends a CONTINUATION frame -> PROTOCOL_ERROR")
def _(conn, path):
    conn.send(raw_frame(CONTINUATION, END_HEADERS, 1, conn.header_block(request_headers(path))))
    return connection_error(conn, PROTOCOL_ERROR)


@case("5.1", "idle: sends a PRIORITY frame: allowed")
def _(conn, path):
    conn.send(raw_frame(PRIORITY, 0, 5, b"\0\0\0\0\x10"))
    conn.send_headers(1, request_headers(path))
    return response(conn, 1, 200)


@case("5.1", "half-closed (remote): sends a DATA frame -> STREAM_CLOSED",
      settings=HOLD_RESPONSE)
def _(conn, path):
    conn.send_headers(1, request_headers(path))
    conn.send_data(1, b"test")
    return stream_error(conn, 1, STREAM_CLOSED)


@case("5.1", "half-closed (remote): sends a HEADERS frame -> STREAM_CLOSED",
      settings=HOLD_RESPONSE)
def _(conn, path):
    conn.send_headers(1, request_headers(path))
    conn.send_headers(1, [("x-trailer", "late")])
    return stream_error(conn, 1, STREAM_CLOSED)


@case("5.1", "half-closed (remote): sends a CONTINUATION frame -> STREAM_CLOSED or PROTOCOL_ERROR",
      settings=HOLD_RESPONSE)
def _(conn, path):
    conn.send_headers(1, request_headers(path))
    conn.send(raw_frame(CONTINUATION, END_HEADERS, 1, conn.header_block([("x-more", "1")])))
    return stream_error(conn, 1, STREAM_CLOSED, PROTOCOL_ERROR)


def reset_stream(conn, path):
    post(conn, 1, path)
    conn.send_rst(1, 0x8)  # CANCEL


@case("5.1", "closed: sends a DATA frame after sending RST_STREAM -> STREAM_CLOSED")
def _(conn, path):
    reset_stream(conn, path)
    conn.send_data(1, b"test")
    return stream_error(conn, 1, STREAM_CLOSED)


@case("5.1", "closed: sends a HEADERS frame after sending RST_STREAM -> STREAM_CLOSED")
def _(conn, path):
    reset_stream(conn, path)
    conn.send_headers(1, [("x-trailer", "late")])
    return stream_error(conn, 1, STREAM_CLOSED)


@case("5.1", "closed: sends a CONTINUATION frame after sending RST_STREAM -> STREAM_CLOSED or PROTOCOL_ERROR")
def _(conn, path):
    reset_stream(conn, path)
    conn.send(raw_frame(CONTINUATION, END_HEADERS, 1, conn.header_block([("x-more", "1")])))
    return stream_error(conn, 1, STREAM_CLOSED, PROTOCOL_ERROR)


def complete_exchange(conn, path):
    conn.send_headers(1, request_headers(path))
    ok, what = response(conn, 1, 200)
    if not ok:
        raise RuntimeError("the first request failed: " + what)


@case("5.1", "closed: sends a DATA frame on a stream closed normally -> STREAM_CLOSED")
def _(conn, path):
    complete_exchange(conn, path)
    conn.send_data(1, b"test")
    return stream_error(conn, 1, STREAM_CLOSED)


@case("5.1", "closed: sends a HEADERS frame on a stream closed normally -> STREAM_CLOSED")
def _(conn, path):
    complete_exchange(conn, path)
    conn.send_headers(1, request_headers(path))
    return stream_error(conn, 1, STREAM_CLOSED)


@case("5.1", "closed: sends a CONTINUATION frame on a stream closed normally -> STREAM_CLOSED or PROTOCOL_ERROR")
def _(conn, path):
    complete_exchange(conn, path)
    conn.send(raw_frame(CONTINUATION, END_HEADERS, 1, conn.header_block([("x-more", "1")])))
    return stream_error(conn, 1, STREAM_CLOSED, PROTOCOL_ERROR)


@case("5.1", "closed: sends a WINDOW_UPDATE on a stream closed normally: allowed")
def _(conn, path):
    complete_exchange(conn, path)
    conn.send_window_update(1, 100)
    return ping_alive(conn)


# 5.1.1 Stream Identifiers

@case("5.1.1", "sends an even-numbered stream identifier -> PROTOCOL_ERROR")
def _(conn, path):
    conn.send_headers(2, request_headers(path))
    return connection_error(conn, PROTOCOL_ERROR)


@case("5.1.1", "sends a stream identifier smaller than a previous one -> PROTOCOL_ERROR")
def _(conn, path):
    conn.send_headers(5, request_headers(path))
    conn.send_headers(3, request_headers(path))
    return connection_error(conn, PROTOCOL_ERROR)


# 5.1.2 Stream Concurrency

@case("5.1.2", "exceeds SETTINGS_MAX_CONCURRENT_STREAMS -> REFUSED_STREAM or PROTOCOL_ERROR",
      settings=HOLD_RESPONSE, alone=True)
def _(conn, path):
    limit = conn.server_settings.get(MAX_CONCURRENT_STREAMS)
    if limit is None or limit > 1000:
        return False, "no usable SETTINGS_MAX_CONCURRENT_STREAMS (%r)" % limit
    for i in range(limit + 1):
        post(conn, 1 + 2 * i, path)
    return stream_error(conn, 1 + 2 * limit, REFUSED_STREAM, PROTOCOL_ERROR)


# 5.3.1 Stream Dependencies

@case("5.3.1", "sends a HEADERS frame that depends on itself -> PROTOCOL_ERROR")
def _(conn, path):
    conn.send(raw_frame(HEADERS, END_STREAM | END_HEADERS | PRIORITY_FLAG, 1,
                        struct.pack(">IB", 1, 16) + conn.header_block(request_headers(path))))
    return stream_error(conn, 1, PROTOCOL_ERROR)


@case("5.3.1", "sends a PRIORITY frame that depends on itself -> PROTOCOL_ERROR")
def _(conn, path):
    conn.send(raw_frame(PRIORITY, 0, 3, struct.pack(">IB", 3, 16)))
    return stream_error(conn, 3, PROTOCOL_ERROR)


# 5.4.1 Connection Error Handling

@case("5.4.1", "sends an invalid PING frame: a GOAWAY, then the connection closes")
def _(conn, path):
    conn.send(raw_frame(PING, 0, 0, b"\0" * 6))
    # Any code: the point here is the GOAWAY (6.7 checks the code).
    ok, what = connection_error(conn, *CODES, need_goaway=True)
    if not ok:
        return ok, what
    for _f in conn.frames():
        pass
    return conn.closed, what + (", then closed" if conn.closed else ", but the connection stays open")


@case("5.4.1", "GOAWAY after a connection error names the last stream processed")
def _(conn, path):
    complete_exchange(conn, path)
    conn.send(raw_frame(PING, 0, 0, b"\0" * 6))
    for f in conn.frames():
        if f.type == GOAWAY:
            last = struct.unpack(">I", f.payload[:4])[0] & 0x7FFFFFFF
            return last == 1, "GOAWAY %s, last stream %d" % (code_name(f.code()), last)
    return False, seen(conn)


# 5.5 Extending HTTP/2

@case("5.5", "sends an unknown extension frame: ignored")
def _(conn, path):
    conn.send(raw_frame(0xFF, 0, 0, b"\0" * 8))
    return ping_alive(conn)


@case("5.5", "sends an unknown extension frame on a stream: ignored")
def _(conn, path):
    conn.send(raw_frame(0xFF, 0xFF, 1, b"x" * 8))
    conn.send_headers(1, request_headers(path))
    return response(conn, 1, 200)


@case("5.5", "sends an unknown extension frame in the middle of a header block -> PROTOCOL_ERROR")
def _(conn, path):
    block = conn.header_block(request_headers(path))
    conn.send(raw_frame(HEADERS, END_STREAM, 1, block))
    conn.send(raw_frame(0xFF, 0, 0, b"\0" * 8))
    conn.send(raw_frame(CONTINUATION, END_HEADERS, 1, conn.header_block([("x-more", "1")])))
    return connection_error(conn, PROTOCOL_ERROR)


# 6.1 DATA

@case("6.1", "sends a DATA frame with stream id 0 -> PROTOCOL_ERROR")
def _(conn, path):
    conn.send(raw_frame(DATA, END_STREAM, 0, b"test"))
    return connection_error(conn, PROTOCOL_ERROR)


@case("6.1", "sends a DATA frame on a stream not open or half-closed (local) -> STREAM_CLOSED",
      settings=HOLD_RESPONSE)
def _(conn, path):
    conn.send_headers(1, request_headers(path))
    conn.send_data(1, b"test")
    return stream_error(conn, 1, STREAM_CLOSED)


@case("6.1", "sends a DATA frame with a pad length >= the payload -> PROTOCOL_ERROR")
def _(conn, path):
    post(conn, 1, path)
    conn.send(raw_frame(DATA, END_STREAM | PADDED, 1, b"\x06test"))
    return connection_error(conn, PROTOCOL_ERROR)


@case("6.1", "sends a padded DATA frame: processed")
def _(conn, path):
    post(conn, 1, path, [("content-length", "4")])
    conn.send(raw_frame(DATA, END_STREAM | PADDED, 1, b"\x05test\0\0\0\0\0"))
    return response(conn, 1, 200)


@case("6.1", "sends an empty DATA frame with END_STREAM: processed")
def _(conn, path):
    post(conn, 1, path)
    conn.send_data(1, b"")
    return response(conn, 1, 200)


# 6.2 HEADERS

@case("6.2", "sends a HEADERS frame without END_HEADERS, then a PRIORITY frame -> PROTOCOL_ERROR")
def _(conn, path):
    conn.send(raw_frame(HEADERS, END_STREAM, 1, conn.header_block(request_headers(path))))
    conn.send(raw_frame(PRIORITY, 0, 1, b"\0\0\0\0\x10"))
    return connection_error(conn, PROTOCOL_ERROR)


@case("6.2", "sends a HEADERS frame to another stream while sending a HEADERS frame -> PROTOCOL_ERROR")
def _(conn, path):
    block = conn.header_block(request_headers(path))
    conn.send(raw_frame(HEADERS, END_STREAM, 1, block))
    conn.send(raw_frame(HEADERS, END_STREAM | END_HEADERS, 3, block))
    return connection_error(conn, PROTOCOL_ERROR)


@case("6.2", "sends a HEADERS frame with stream id 0 -> PROTOCOL_ERROR")
def _(conn, path):
    conn.send(raw_frame(HEADERS, END_STREAM | END_HEADERS, 0, conn.header_block(request_headers(path))))
    return connection_error(conn, PROTOCOL_ERROR)


@case("6.2", "sends a HEADERS frame with a pad length >= the payload -> PROTOCOL_ERROR")
def _(conn, path):
    block = conn.header_block(request_headers(path))
    conn.send(raw_frame(HEADERS, END_STREAM | END_HEADERS | PADDED, 1, bytes([len(block) + 1]) + block))
    return connection_error(conn, PROTOCOL_ERROR)


@case("6.2", "sends a padded HEADERS frame with priority: processed")
def _(conn, path):
    block = conn.header_block(request_headers(path))
    conn.send(raw_frame(HEADERS, END_STREAM | END_HEADERS | PADDED | PRIORITY_FLAG, 1,
                        b"\x03" + struct.pack(">IB", 0, 200) + block + b"\0\0\0"))
    return response(conn, 1, 200)


# 6.3 PRIORITY

@case("6.3", "sends a PRIORITY frame with stream id 0 -> PROTOCOL_ERROR")
def _(conn, path):
    conn.send(raw_frame(PRIORITY, 0, 0, b"\0\0\0\x01\x10"))
    return connection_error(conn, PROTOCOL_ERROR)


@case("6.3", "sends a PRIORITY frame with a length other than 5 -> FRAME_SIZE_ERROR")
def _(conn, path):
    post(conn, 1, path)
    conn.send(raw_frame(PRIORITY, 0, 1, b"\0\0\0\0\x10\0"))
    return stream_error(conn, 1, FRAME_SIZE_ERROR)


# 6.4 RST_STREAM

@case("6.4", "sends a RST_STREAM frame with stream id 0 -> PROTOCOL_ERROR")
def _(conn, path):
    conn.send(raw_frame(RST_STREAM, 0, 0, b"\0\0\0\x08"))
    return connection_error(conn, PROTOCOL_ERROR)


@case("6.4", "sends a RST_STREAM frame on an idle stream -> PROTOCOL_ERROR")
def _(conn, path):
    conn.send(raw_frame(RST_STREAM, 0, 3, b"\0\0\0\x08"))
    return connection_error(conn, PROTOCOL_ERROR)


@case("6.4", "sends a RST_STREAM frame with a length other than 4 -> FRAME_SIZE_ERROR")
def _(conn, path):
    post(conn, 1, path)
    conn.send(raw_frame(RST_STREAM, 0, 1, b"\0\0\0\x08\0"))
    return connection_error(conn, FRAME_SIZE_ERROR)


@case("6.4", "sends a RST_STREAM on an open stream: the connection goes on")
def _(conn, path):
    post(conn, 1, path)
    conn.send_rst(1, 0x8)
    conn.send_headers(3, request_headers(path))
    return response(conn, 3, 200)


# 6.5 SETTINGS

@case("6.5", "sends a SETTINGS frame with ACK and a payload -> FRAME_SIZE_ERROR")
def _(conn, path):
    conn.send(raw_frame(SETTINGS, ACK, 0, settings_payload([(ENABLE_PUSH, 0)])))
    return connection_error(conn, FRAME_SIZE_ERROR)


@case("6.5", "sends a SETTINGS frame with a stream id other than 0 -> PROTOCOL_ERROR")
def _(conn, path):
    conn.send(raw_frame(SETTINGS, 0, 1, settings_payload([(ENABLE_PUSH, 0)])))
    return connection_error(conn, PROTOCOL_ERROR)


@case("6.5", "sends a SETTINGS frame with a length not a multiple of 6 -> FRAME_SIZE_ERROR")
def _(conn, path):
    conn.send(raw_frame(SETTINGS, 0, 0, settings_payload([(ENABLE_PUSH, 0)])[:3]))
    return connection_error(conn, FRAME_SIZE_ERROR)


# 6.5.2 Defined SETTINGS Parameters

@case("6.5.2", "SETTINGS_ENABLE_PUSH other than 0 or 1 -> PROTOCOL_ERROR")
def _(conn, path):
    conn.send_settings([(ENABLE_PUSH, 2)])
    return connection_error(conn, PROTOCOL_ERROR)


@case("6.5.2", "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1 -> FLOW_CONTROL_ERROR")
def _(conn, path):
    conn.send_settings([(INITIAL_WINDOW_SIZE, 2 ** 31)])
    return connection_error(conn, FLOW_CONTROL_ERROR)


@case("6.5.2", "SETTINGS_MAX_FRAME_SIZE below 2^14 -> PROTOCOL_ERROR")
def _(conn, path):
    conn.send_settings([(MAX_FRAME_SIZE, 16383)])
    return connection_error(conn, PROTOCOL_ERROR)


@case("6.5.2", "SETTINGS_MAX_FRAME_SIZE above 2^24-1 -> PROTOCOL_ERROR")
def _(conn, path):
    conn.send_settings([(MAX_FRAME_SIZE, 2 ** 24)])
    return connection_error(conn, PROTOCOL_ERROR)


@case("6.5.2", "a SETTINGS frame with an unknown identifier: ignored")
def _(conn, path):
    conn.send(raw_frame(SETTINGS, 0, 0, settings_payload([(0xFF, 1)])))
    return ping_alive(conn)


@case("6.5.2", "SETTINGS_ENABLE_PUSH = 1 from a client: accepted")
def _(conn, path):
    conn.send_settings([(ENABLE_PUSH, 1)])
    conn.send_headers(1, request_headers(path))
    return response(conn, 1, 200)


@case("6.5.2", "SETTINGS_HEADER_TABLE_SIZE = 0: the response uses no dynamic table",
      settings=[(HEADER_TABLE_SIZE, 0)])
def _(conn, path):
    conn.decoder.max_allowed_table_size = 0
    conn.send_headers(1, request_headers(path))
    ok, what = response(conn, 1, 200)
    conn.send_headers(3, request_headers(path))
    ok3, what3 = response(conn, 3, 200)
    return ok and ok3, "%s; %s" % (what, what3)


@case("6.5.2", "SETTINGS_MAX_FRAME_SIZE = 2^24-1: accepted")
def _(conn, path):
    conn.send_settings([(MAX_FRAME_SIZE, 2 ** 24 - 1)])
    conn.send_headers(1, request_headers(path))
    return response(conn, 1, 200)


# 6.5.3 Settings Synchronization

@case("6.5.3", "several SETTINGS_INITIAL_WINDOW_SIZE values: the last one counts")
def _(conn, path):
    conn.send_settings([(INITIAL_WINDOW_SIZE, 100), (INITIAL_WINDOW_SIZE, 1)])
    conn.send_headers(1, request_headers(path))
    return data_of_length(conn, 1, 1)


@case("6.5.3", "sends a SETTINGS frame: the server ACKs it")
def _(conn, path):
    conn.send_settings([(INITIAL_WINDOW_SIZE, 65535)])
    for f in conn.frames():
        if f.type == SETTINGS:
            return bool(f.flags & ACK) and not f.payload, str(f)
    return False, seen(conn)


# 6.7 PING

@case("6.7", "sends a PING frame: a PING ACK with the same payload")
def _(conn, path):
    return ping_alive(conn, b"\x01\x02\x03\x04\x05\x06\x07\x08")


@case("6.7", "sends a PING frame with ACK: not answered")
def _(conn, path):
    conn.send_ping(b"unexpect", ack=True)
    conn.send_ping(b"expected")
    for f in conn.frames():
        if f.type == PING and f.flags & ACK:
            return f.payload == b"expected", "PING ACK %r" % f.payload
    return False, seen(conn)


@case("6.7", "sends a PING frame with a stream id other than 0 -> PROTOCOL_ERROR")
def _(conn, path):
    conn.send(raw_frame(PING, 0, 1, b"h2c-ping"))
    return connection_error(conn, PROTOCOL_ERROR)


@case("6.7", "sends a PING frame with a length other than 8 -> FRAME_SIZE_ERROR")
def _(conn, path):
    conn.send(raw_frame(PING, 0, 0, b"h2c-ping!"))
    return connection_error(conn, FRAME_SIZE_ERROR)


# 6.8 GOAWAY

@case("6.8", "sends a GOAWAY frame with a stream id other than 0 -> PROTOCOL_ERROR")
def _(conn, path):
    conn.send(raw_frame(GOAWAY, 0, 1, b"\0\0\0\0\0\0\0\0"))
    return connection_error(conn, PROTOCOL_ERROR)


@case("6.8", "sends a GOAWAY: the server finishes the open stream")
def _(conn, path):
    conn.send_headers(1, request_headers(path))
    conn.send(raw_frame(GOAWAY, 0, 0, b"\0\0\0\0\0\0\0\0"))
    return response(conn, 1, 200)


# 6.9 WINDOW_UPDATE

@case("6.9", "sends a WINDOW_UPDATE with an increment of 0 on the connection -> PROTOCOL_ERROR")
def _(conn, path):
    conn.send(raw_frame(WINDOW_UPDATE, 0, 0, b"\0\0\0\0"))
    return connection_error(conn, PROTOCOL_ERROR)


@case("6.9", "sends a WINDOW_UPDATE with an increment of 0 on a stream -> PROTOCOL_ERROR")
def _(conn, path):
    post(conn, 1, path)
    conn.send(raw_frame(WINDOW_UPDATE, 0, 1, b"\0\0\0\0"))
    return stream_error(conn, 1, PROTOCOL_ERROR)


@case("6.9", "sends a WINDOW_UPDATE with a length other than 4 -> FRAME_SIZE_ERROR")
def _(conn, path):
    conn.send(raw_frame(WINDOW_UPDATE, 0, 0, b"\0\0\0\x01\0"))
    return connection_error(conn, FRAME_SIZE_ERROR)


# 6.9.1 The Flow-Control Window

@case("6.9.1", "SETTINGS_INITIAL_WINDOW_SIZE = 1: the response comes in DATA of 1 byte",
      settings=[(INITIAL_WINDOW_SIZE, 1)])
def _(conn, path):
    conn.send_headers(1, request_headers(path))
    return data_of_length(conn, 1, 1)


@case("6.9.1", "WINDOW_UPDATEs beyond 2^31-1 on the connection -> FLOW_CONTROL_ERROR")
def _(conn, path):
    conn.send_window_update(0, 2 ** 31 - 1)
    conn.send_window_update(0, 2 ** 31 - 1)
    return connection_error(conn, FLOW_CONTROL_ERROR)


@case("6.9.1", "WINDOW_UPDATEs beyond 2^31-1 on a stream -> FLOW_CONTROL_ERROR",
      settings=HOLD_RESPONSE)
def _(conn, path):
    post(conn, 1, path)
    conn.send_window_update(1, 2 ** 31 - 1)
    conn.send_window_update(1, 2 ** 31 - 1)
    return stream_error(conn, 1, FLOW_CONTROL_ERROR)


@case("6.9.1", "sends more DATA than the stream window the server advertised -> FLOW_CONTROL_ERROR")
def _(conn, path):
    window = conn.server_settings.get(INITIAL_WINDOW_SIZE, 65535)
    frame_size = 16384
    post(conn, 1, path)
    sent = 0
    while sent <= window:
        conn.send_data(1, b"x" * frame_size, end_stream=False)
        sent += frame_size
    return stream_error(conn, 1, FLOW_CONTROL_ERROR)


# 6.9.2 Initial Flow-Control Window Size

@case("6.9.2", "SETTINGS_INITIAL_WINDOW_SIZE changed after HEADERS: the new window applies",
      settings=[(INITIAL_WINDOW_SIZE, 0)])
def _(conn, path):
    conn.send_headers(1, request_headers(path))
    for f in conn.frames(0.3):  # the response head (not flow-controlled) may come first
        if f.type == DATA and f.payload:
            return False, "DATA of %d bytes sent into a window of 0" % len(f.payload)
    conn.send_settings([(INITIAL_WINDOW_SIZE, 1)])
    return data_of_length(conn, 1, 1)


@case("6.9.2", "SETTINGS_INITIAL_WINDOW_SIZE makes a window negative: the server waits for it",
      settings=[(INITIAL_WINDOW_SIZE, 1)])
def _(conn, path):
    conn.send_headers(1, request_headers(path))
    ok, what = data_of_length(conn, 1, 1)
    if not ok:
        return ok, "first DATA: " + what
    conn.send_settings([(INITIAL_WINDOW_SIZE, 0)])  # the window is now 0 - 1 = -1
    conn.send_window_update(1, 1)  # back to 0: nothing may be sent
    for f in conn.frames(0.3):
        if f.type == DATA and f.payload:
            return False, "DATA of %d bytes sent into a window of 0" % len(f.payload)
    conn.send_window_update(1, 1)  # 1
    return data_of_length(conn, 1, 1)


@case("6.9.2", "SETTINGS_INITIAL_WINDOW_SIZE pushing an open stream's window beyond 2^31-1 -> FLOW_CONTROL_ERROR",
      settings=HOLD_RESPONSE)
def _(conn, path):
    post(conn, 1, path)
    conn.send_window_update(1, 2 ** 31 - 1)  # the stream window is now 2^31-1
    conn.send_settings([(INITIAL_WINDOW_SIZE, 1)])  # and would be 2^31
    return connection_error(conn, FLOW_CONTROL_ERROR)


# 6.10 CONTINUATION

def continued(conn, path, frames):
    """A request whose header block is split into a HEADERS and `frames` CONTINUATION frames."""
    block = conn.header_block(request_headers(path, extra=[("x-dummy%d" % i, "v" * 40) for i in range(5)]))
    step = -(-len(block) // (frames + 1))
    parts = [block[i:i + step] for i in range(0, len(block), step)]
    assert len(parts) == frames + 1, (len(block), step, len(parts))
    conn.send(raw_frame(HEADERS, END_STREAM, 1, parts[0]))
    for i, part in enumerate(parts[1:], 1):
        conn.send(raw_frame(CONTINUATION, END_HEADERS if i == len(parts) - 1 else 0, 1, part))
    return response(conn, 1, 200)


@case("6.10", "sends two CONTINUATION frames after a HEADERS frame: processed")
def _(conn, path):
    return continued(conn, path, 2)


@case("6.10", "sends ten small CONTINUATION frames after a HEADERS frame: processed")
def _(conn, path):
    return continued(conn, path, 10)


@case("6.10", "sends a CONTINUATION frame followed by a frame other than CONTINUATION -> PROTOCOL_ERROR")
def _(conn, path):
    block = conn.header_block(request_headers(path))
    conn.send(raw_frame(HEADERS, END_STREAM, 1, block[:4]))
    conn.send(raw_frame(CONTINUATION, 0, 1, block[4:]))
    conn.send(raw_frame(DATA, END_STREAM, 1, b"test"))
    return connection_error(conn, PROTOCOL_ERROR)


@case("6.10", "sends a CONTINUATION frame with stream id 0 -> PROTOCOL_ERROR")
def _(conn, path):
    block = conn.header_block(request_headers(path))
    conn.send(raw_frame(HEADERS, END_STREAM, 1, block[:4]))
    conn.send(raw_frame(CONTINUATION, END_HEADERS, 0, block[4:]))
    return connection_error(conn, PROTOCOL_ERROR)


@case("6.10", "sends a CONTINUATION frame for another stream -> PROTOCOL_ERROR")
def _(conn, path):
    block = conn.header_block(request_headers(path))
    conn.send(raw_frame(HEADERS, END_STREAM, 1, block[:4]))
    conn.send(raw_frame(CONTINUATION, END_HEADERS, 3, block[4:]))
    return connection_error(conn, PROTOCOL_ERROR)


@case("6.10", "sends a CONTINUATION frame after a HEADERS frame with END_HEADERS -> PROTOCOL_ERROR")
def _(conn, path):
    post(conn, 1, path)
    conn.send(raw_frame(CONTINUATION, END_HEADERS, 1, conn.header_block([("x-more", "1")])))
    return connection_error(conn, PROTOCOL_ERROR)


@case("6.10", "sends a CONTINUATION frame after a CONTINUATION frame with END_HEADERS -> PROTOCOL_ERROR")
def _(conn, path):
    block = conn.header_block(request_headers(path, "POST"))
    conn.send(raw_frame(HEADERS, 0, 1, block[:4]))
    conn.send(raw_frame(CONTINUATION, END_HEADERS, 1, block[4:]))
    conn.send(raw_frame(CONTINUATION, END_HEADERS, 1, conn.header_block([("x-more", "1")])))
    return connection_error(conn, PROTOCOL_ERROR)


@case("6.10", "sends a CONTINUATION frame after a DATA frame -> PROTOCOL_ERROR")
def _(conn, path):
    post(conn, 1, path)
    conn.send_data(1, b"test", end_stream=False)
    conn.send(raw_frame(CONTINUATION, END_HEADERS, 1, conn.header_block([("x-more", "1")])))
    return connection_error(conn, PROTOCOL_ERROR)


# 8.1 HTTP Request/Response Exchange

@case("8.1", "sends a request with a body and trailers: processed")
def _(conn, path):
    post(conn, 1, path, [("te", "trailers")])
    conn.send_data(1, b"body", end_stream=False)
    conn.send_headers(1, [("x-checksum", "abc")])
    return response(conn, 1, 200)


@case("8.1", "sends a second HEADERS frame (trailers) without END_STREAM -> PROTOCOL_ERROR",
      malformed_request=True, settings=HOLD_RESPONSE)
def _(conn, path):
    post(conn, 1, path)
    conn.send_headers(1, [("x-trailer", "1")], end_stream=False)
    return stream_error(conn, 1, PROTOCOL_ERROR)


@case("8.1", "sends DATA after the trailers -> STREAM_CLOSED",
      settings=HOLD_RESPONSE)
def _(conn, path):
    post(conn, 1, path)
    conn.send_data(1, b"body", end_stream=False)
    conn.send_headers(1, [("x-trailer", "1")])
    conn.send_data(1, b"more")
    return stream_error(conn, 1, STREAM_CLOSED)


@case("8.1", "sends a request whose body takes several DATA frames: processed")
def _(conn, path):
    post(conn, 1, path, [("content-length", "12")])
    for chunk in (b"four", b"four"):
        conn.send_data(1, chunk, end_stream=False)
    conn.send_data(1, b"four")
    return response(conn, 1, 200)


@case("8.1", "sends a HEAD request: a response without a body")
def _(conn, path):
    conn.send_headers(1, request_headers(path, "HEAD"))
    ok, what = response(conn, 1, 200)
    data = [s for s in conn.seen if s.startswith("DATA(stream 1,") and " 0 bytes" not in s]
    if ok and data:
        return False, "HEAD answered with a body: " + ", ".join(data)
    return ok, what


# 8.1.2 HTTP Header Fields (RFC 9113 8.2)

def malformed_case(section, description, headers_fn):
    @case(section, description, malformed_request=True)
    def _(conn, path):
        conn.send_headers(1, headers_fn(path))
        return malformed(conn, 1)


malformed_case("8.1.2", "a header field name in uppercase -> malformed",
               lambda p: request_headers(p, extra=[("X-Test", "ok")]))
malformed_case("8.1.2", "a header field name with a space -> malformed",
               lambda p: request_headers(p, extra=[("x test", "ok")]))
malformed_case("8.1.2", "a header field name with a colon inside -> malformed",
               lambda p: request_headers(p, extra=[("x:test", "ok")]))
malformed_case("8.1.2", "an empty header field name -> malformed",
               lambda p: request_headers(p, extra=[("", "ok")]))
malformed_case("8.1.2", "a header field value with CR LF -> malformed",
               lambda p: request_headers(p, extra=[("x-test", "a\r\nx-injected: 1")]))
malformed_case("8.1.2", "a header field value with NUL -> malformed",
               lambda p: request_headers(p, extra=[("x-test", "a\0b")]))
malformed_case("8.1.2", "a header field value with leading whitespace -> malformed",
               lambda p: request_headers(p, extra=[("x-test", " leading")]))
malformed_case("8.1.2", "a header field value with trailing whitespace -> malformed",
               lambda p: request_headers(p, extra=[("x-test", "trailing\t")]))

# 8.1.2.1 Pseudo-Header Fields
malformed_case("8.1.2.1", "an unknown pseudo-header field -> malformed",
               lambda p: request_headers(p, extra=[(":test", "ok")]))
malformed_case("8.1.2.1", "the response pseudo-header :status in a request -> malformed",
               lambda p: request_headers(p, extra=[(":status", "200")]))
malformed_case("8.1.2.1", "a pseudo-header field after a regular header field -> malformed",
               lambda p: request_headers(p)[:3] + [("x-test", "ok"), (":authority", "localhost")])


@case("8.1.2.1", "a pseudo-header field in trailers -> malformed", malformed_request=True,
      settings=HOLD_RESPONSE)
def _(conn, path):
    post(conn, 1, path)
    conn.send_data(1, b"body", end_stream=False)
    conn.send_headers(1, [(":method", "POST")])
    return malformed(conn, 1)


# 8.1.2.2 Connection-Specific Header Fields
malformed_case("8.1.2.2", "connection: keep-alive -> malformed",
               lambda p: request_headers(p, extra=[("connection", "keep-alive")]))
malformed_case("8.1.2.2", "keep-alive header -> malformed",
               lambda p: request_headers(p, extra=[("keep-alive", "timeout=5")]))
malformed_case("8.1.2.2", "transfer-encoding: chunked -> malformed",
               lambda p: request_headers(p, extra=[("transfer-encoding", "chunked")]))
malformed_case("8.1.2.2", "upgrade: websocket -> malformed",
               lambda p: request_headers(p, extra=[("upgrade", "websocket")]))
malformed_case("8.1.2.2", "proxy-connection: keep-alive -> malformed",
               lambda p: request_headers(p, extra=[("proxy-connection", "keep-alive")]))
malformed_case("8.1.2.2", "te: gzip -> malformed",
               lambda p: request_headers(p, extra=[("te", "gzip")]))


@case("8.1.2.2", "te: trailers: accepted")
def _(conn, path):
    conn.send_headers(1, request_headers(path, extra=[("te", "trailers")]))
    return response(conn, 1, 200)


# 8.1.2.3 Request Pseudo-Header Fields
malformed_case("8.1.2.3", "an empty :path -> malformed",
               lambda p: [(":method", "GET"), (":scheme", "https"), (":path", ""), (":authority", "localhost")])
malformed_case("8.1.2.3", "omits :method -> malformed",
               lambda p: [(":scheme", "https"), (":path", p), (":authority", "localhost")])
malformed_case("8.1.2.3", "omits :scheme -> malformed",
               lambda p: [(":method", "GET"), (":path", p), (":authority", "localhost")])
malformed_case("8.1.2.3", "omits :path -> malformed",
               lambda p: [(":method", "GET"), (":scheme", "https"), (":authority", "localhost")])
malformed_case("8.1.2.3", "duplicated :method -> malformed",
               lambda p: [(":method", "GET")] + request_headers(p))
malformed_case("8.1.2.3", "duplicated :scheme -> malformed",
               lambda p: [(":scheme", "https")] + request_headers(p))
malformed_case("8.1.2.3", "duplicated :path -> malformed",
               lambda p: [(":path", p)] + request_headers(p))
malformed_case("8.1.2.3", "duplicated :authority -> malformed",
               lambda p: request_headers(p) + [(":authority", "localhost")])
malformed_case("8.1.2.3", "a :path that is neither absolute nor * -> malformed",
               lambda p: request_headers(p.lstrip("/")))


@case("8.1.2.3", "omits :authority but sends host: accepted")
def _(conn, path):
    conn.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":path", path), ("host", "localhost")])
    return response(conn, 1, 200)


# 8.1.2.5 Compressing the Cookie Header Field

@case("8.1.2.5", "sends the cookie header in several fields: accepted")
def _(conn, path):
    conn.send_headers(1, request_headers(path, extra=[("cookie", "a=b"), ("cookie", "c=d")]))
    return response(conn, 1, 200)


# 8.1.2.6 Malformed Requests and Responses

@case("8.1.2.6", "content-length not equal to the DATA payload length -> malformed", malformed_request=True)
def _(conn, path):
    post(conn, 1, path, [("content-length", "1")])
    conn.send_data(1, b"test")
    return malformed(conn, 1)


@case("8.1.2.6", "content-length not equal to the sum of several DATA payloads -> malformed",
      malformed_request=True)
def _(conn, path):
    post(conn, 1, path, [("content-length", "1")])
    conn.send_data(1, b"test", end_stream=False)
    conn.send_data(1, b"test")
    return malformed(conn, 1)


@case("8.1.2.6", "content-length larger than the body that ends the stream -> malformed",
      malformed_request=True)
def _(conn, path):
    post(conn, 1, path, [("content-length", "100")])
    conn.send_data(1, b"test")
    return malformed(conn, 1)


malformed_case("8.1.2.6", "a content-length that is not a number -> malformed",
               lambda p: request_headers(p, "POST", [("content-length", "abc")]))


# 8.2 Server Push

@case("8.2", "sends a PUSH_PROMISE frame -> PROTOCOL_ERROR")
def _(conn, path):
    conn.send_headers(1, request_headers(path), end_stream=False)
    conn.send(raw_frame(PUSH_PROMISE, END_HEADERS, 1,
                        struct.pack(">I", 2) + conn.header_block(request_headers(path))))
    return connection_error(conn, PROTOCOL_ERROR)


# Last: an ordinary request still works.

@case("sanity", "an ordinary GET after all the cases: 200 with a backend's id")
def _(conn, path):
    conn.send_headers(1, request_headers(path))
    ok, what = response(conn, 1, 200)
    body = conn.bodies.get(1, b"").decode("utf-8", "replace")
    return ok and body in OPTS.backends, "%s, body %r" % (what, body)


# ---------------------------------------------------------------------------------------------

def run(c):
    path = "/h2c/" + c["id"].replace(".", "_").replace("/", "-")
    started = time.monotonic()
    conn = None
    try:
        conn = Conn()
        if c["handshake"]:
            conn.handshake(c["settings"])
        elif c["settings"]:
            raise RuntimeError("settings without a handshake")
        passed, what = c["fn"](conn, path)
    except Exception as e:  # noqa: BLE001 - a case that cannot run fails, with the reason
        passed, what = False, "error: %s" % (e if str(e) else traceback.format_exc(limit=2))
    finally:
        if conn is not None:
            conn.close()
    return dict(id=c["id"], section=c["section"], description=c["description"],
                passed=bool(passed), seen=what, path=path, malformed=c["malformed"],
                seconds=round(time.monotonic() - started, 3))


def main():
    global OPTS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True, help="CA file to verify the server certificate with")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for a frame")
    p.add_argument("--jobs", type=int, default=8, help="cases run side by side")
    p.add_argument("--only", help="run only cases whose id starts with this")
    p.add_argument("--backends", default="b1,b2",
                   help="comma-separated backend ids the sanity response body may be")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    OPTS = p.parse_args()
    OPTS.backends = OPTS.backends.split(",")

    cases = [c for c in CASES if c["section"] != "sanity"]
    if OPTS.only:
        cases = [c for c in cases if c["id"].startswith(OPTS.only)]
    with ThreadPoolExecutor(max_workers=max(1, OPTS.jobs)) as pool:
        results = list(pool.map(run, [c for c in cases if not c["alone"]]))
    results += [run(c) for c in cases if c["alone"]]
    results.append(run(next(c for c in CASES if c["section"] == "sanity")))
    for r in results:
        print("%-8s %-4s %s: %s [%s]" % (r["id"], "PASS" if r["passed"] else "FAIL",
                                        r["description"], r["seen"], r["seconds"]))
    passed = sum(r["passed"] for r in results)
    print("%d passed, %d failed, %d cases" % (passed, len(results) - passed, len(results)))
    if OPTS.json:
        print(json.dumps(dict(passed=passed, failed=len(results) - passed, cases=results)))
    sys.stdout.flush()
    return 0 if results[-1]["passed"] else 2


if __name__ == "__main__":
    sys.exit(main())
