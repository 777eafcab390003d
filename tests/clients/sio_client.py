#!/usr/bin/env python3
"""A scriptable Socket.IO client for rideshare (and for tether in front of it).

It is a real client (python-socketio), not our own protocol code: tests drive it as a child
process and read what it saw. It logs in over HTTP with a requests.Session (cookies kept), then
connects Socket.IO with that session's cookies, so the socket is authenticated by the session
cookie as a browser's would be.

Output: one JSON object per line on stdout, each with a "type":
  http          an app HTTP call: method, path, status, instance (x-backend-id), body
  ride          the ride created by --request-ride: {"ride": {...}}
  connected     Socket.IO connected: sid, transport
  event         a server event: {"event": name, "data": ...} (hello, location, rideStatus,
                driverPosition, ...)
  ack           an ack to one of our emits: {"event", "data", "ok"}
  connect_error the server refused the connection, verbatim: {"message": ...}
  http_error    a non-2xx answer to a Socket.IO HTTP request (polling), verbatim:
                {"status", "url", "instance", "body"} (e.g. 400 "Session ID unknown")
  socketio_http every Socket.IO HTTP answer, with --trace-http: {"method", "status", "instance"}
  disconnect    the connection ended: {"reason"}
  error         something went wrong in this client: {"message"}
  summary       always last: {"ok", "received": {event: count}, "errors": [...], "sid", ...}

Exit status: 0 ok; 1 an error (HTTP call failed, connect refused, an ack said no); 2 bad
arguments; 3 the expected events did not arrive before --timeout.

Commands on stdin (with --stdin), one per line; each prints an "ack" or "http" line:
  join RIDE_ID                   emit joinRide {"rideId"} and print the ack
  location RIDE_ID LAT LNG       emit locationUpdate {"rideId", "lat", "lng"} and print the ack
  watch                          emit watchDrivers (no data) and print the ack
  position LAT LNG               emit driverPosition {"lat", "lng"} and print the ack
  emit EVENT [JSON]              emit any event (with an ack, waited for up to 15 s)
  http METHOD PATH [JSON]        an HTTP call with the session's cookies, e.g. http POST /rides/ID/accept
  quit                           disconnect and exit (so does end of input)
Command failures are reported, not fatal: the test decides what they mean.

Examples:
  sio_client.py --url http://127.0.0.1:3001 --name alice --role rider \
      --request-ride "Gare du Nord" "Orly" --join-created --expect-event rideStatus=1 --timeout 20
  sio_client.py --url http://127.0.0.1:8080 --name bob --role driver --transports polling \
      --accept RIDE --join RIDE --send-locations 5 --interval 0.2
  sio_client.py --url http://127.0.0.1:3001 --name erin --role rider --watch-drivers \
      --expect-event driverPosition=3
Install: python3 -m pip install -r tests/clients/requirements.txt
"""

import argparse
import json
import shlex
import sys
import threading
import time

INSTALL = "python3 -m pip install -r tests/clients/requirements.txt"

try:
    import requests
    import socketio
    import websocket  # noqa: F401  (websocket-client: needed for the websocket transport)
except ImportError as exc:  # pragma: no cover - depends on the machine
    print(json.dumps({"type": "error", "message": f"{exc}: install with `{INSTALL}`"}), flush=True)
    sys.exit(1)

# Generous: the suite runs many servers and clients at once on small CI machines.
ACK_TIMEOUT = 15.0

_print_lock = threading.Lock()


def emit_line(kind, **fields):
    """Prints one JSON line (thread-safe: events arrive on the client's threads)."""
    fields = {"type": kind, **fields}
    with _print_lock:
        sys.stdout.write(json.dumps(fields, default=str) + "\n")
        sys.stdout.flush()


def run_bounded(target, remaining, give_up=lambda: False, grace=1.0):
    """Runs target() in a daemon thread; returns whether it finished before remaining() ran
    out, or within `grace` seconds of give_up() turning true. A thread left running is
    abandoned (the process exits with os._exit)."""
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    given_up_at = None
    while thread.is_alive():
        if remaining() <= 0:
            return False
        if given_up_at is None and give_up():
            given_up_at = time.monotonic()
        if given_up_at is not None and time.monotonic() - given_up_at > grace:
            return False
        thread.join(timeout=0.05)
    return True


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Scriptable Socket.IO client for rideshare (JSON lines on stdout).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Output:")[1] if "Output:" in __doc__ else None,
    )
    p.add_argument("--url", required=True,
                   help="base URL of the app or of the balancer in front of it")
    p.add_argument("--login-url",
                   help="base URL for the HTTP calls (login, rides); default: --url")
    p.add_argument("--name", help="user name to log in as")
    p.add_argument("--role", choices=["rider", "driver"], help="role to log in as")
    p.add_argument("--no-login", action="store_true",
                   help="connect without logging in (the server should refuse)")
    p.add_argument("--cookie", action="append", default=[], metavar="NAME=VALUE",
                   help="an extra cookie to send (e.g. a forged rs.sid)")
    p.add_argument("--transports", default="polling,websocket",
                   help="polling, websocket, or polling,websocket (polling then upgrade; default)")
    p.add_argument("--socketio-path", default="socket.io")
    p.add_argument("--request-ride", nargs=2, metavar=("FROM", "TO"),
                   help="(rider) POST /rides before connecting; prints a 'ride' line")
    p.add_argument("--accept", metavar="RIDE_ID",
                   help="(driver) POST /rides/RIDE_ID/accept before connecting")
    p.add_argument("--join", action="append", default=[], metavar="RIDE_ID",
                   help="emit joinRide after connecting (repeatable)")
    p.add_argument("--join-created", action="store_true",
                   help="join the ride made by --request-ride")
    p.add_argument("--send-locations", type=int, default=0, metavar="K",
                   help="(driver) emit K locationUpdate for the first joined ride")
    p.add_argument("--watch-drivers", action="store_true",
                   help="emit watchDrivers after connecting (and after the joins)")
    p.add_argument("--interval", type=float, default=0.1,
                   help="seconds between location updates (default 0.1)")
    p.add_argument("--expect", type=int, metavar="N",
                   help="wait until N events other than 'hello' have arrived")
    p.add_argument("--expect-event", action="append", default=[], metavar="EVENT=N",
                   help="wait until N events named EVENT have arrived (repeatable)")
    p.add_argument("--stdin", action="store_true",
                   help="after the scripted steps, run commands from stdin until quit/EOF")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="overall deadline in seconds (default 30)")
    p.add_argument("--trace-http", action="store_true",
                   help="print every Socket.IO HTTP answer with its x-backend-id")
    p.add_argument("--reconnect", action="store_true",
                   help="let the client reconnect by itself after a disconnect")
    args = p.parse_args(argv)
    if not args.no_login and not (args.name and args.role):
        p.error("--name and --role are required unless --no-login")
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    if not transports or any(t not in ("polling", "websocket") for t in transports):
        p.error("--transports takes polling, websocket or polling,websocket")
    args.transports = transports
    expected = {}
    for item in args.expect_event:
        name, sep, count = item.partition("=")
        if not sep or not count.isdigit():
            p.error(f"--expect-event takes EVENT=N, got {item!r}")
        expected[name] = int(count)
    args.expected = expected
    return args


class Run:
    """The state of one client run: counts, errors, and the condition the main thread waits on."""

    def __init__(self, args):
        self.args = args
        self.base = args.url.rstrip("/")
        self.http_base = (args.login_url or args.url).rstrip("/")
        self.received = {}
        self.errors = []
        self.cond = threading.Condition()
        self.deadline = time.monotonic() + args.timeout
        self.created_ride = None
        # Set once we start disconnecting: the long-poll still in flight then gets the server's
        # 400 for a session it just closed, which is the end of the session, not an error.
        self.closing = False

        self.http = requests.Session()
        # Talk to exactly the URL given: no proxy settings from the environment.
        self.http.trust_env = False
        for item in args.cookie:
            name, _, value = item.partition("=")
            self.http.cookies.set(name, value)
        self.http.hooks["response"].append(self.on_http_response)

        self.sio = socketio.Client(
            http_session=self.http,
            reconnection=args.reconnect,
            handle_sigint=False,
            logger=False,
            engineio_logger=False,
        )
        self.sio.on("connect", self.on_connect)
        self.sio.on("connect_error", self.on_connect_error)
        self.sio.on("disconnect", self.on_disconnect)
        self.sio.on("*", self.on_event)

    # --- Socket.IO callbacks (client threads) -------------------------------------------------

    def on_http_response(self, resp, *_args, **_kwargs):
        if f"/{self.args.socketio_path.strip('/')}/" not in resp.url:
            return
        instance = resp.headers.get("x-backend-id")
        if self.args.trace_http:
            emit_line("socketio_http", method=resp.request.method, status=resp.status_code,
                      instance=instance)
        if not 200 <= resp.status_code < 300:
            emit_line("http_error", status=resp.status_code, url=resp.url, instance=instance,
                      body=resp.text, closing=self.closing)
            if not self.closing:
                self.error(f"socket.io HTTP {resp.status_code}: {resp.text}")

    def on_connect(self):
        emit_line("connected", sid=self.sio.get_sid(), transport=self.sio.transport())

    def on_connect_error(self, data=None):
        message = data.get("message", data) if isinstance(data, dict) else data
        emit_line("connect_error", message=message, data=data)
        self.error(f"connect_error: {message}")

    def on_disconnect(self, reason=None):
        emit_line("disconnect", reason=reason)
        with self.cond:
            self.cond.notify_all()

    def on_event(self, event, *data):
        payload = data[0] if len(data) == 1 else list(data)
        emit_line("event", event=event, data=payload)
        with self.cond:
            self.received[event] = self.received.get(event, 0) + 1
            self.cond.notify_all()

    # --- helpers ------------------------------------------------------------------------------

    def error(self, message):
        with self.cond:
            self.errors.append(message)
            self.cond.notify_all()

    def call(self, method, path, body=None):
        """An app HTTP call with the session's cookies; prints an 'http' line; returns (status, json)."""
        url = self.http_base + path
        try:
            resp = self.http.request(method, url, json=body, timeout=10)
        except requests.RequestException as exc:
            emit_line("http", method=method, path=path, status=None, error=str(exc))
            return None, None
        try:
            parsed = resp.json()
        except ValueError:
            parsed = resp.text
        emit_line("http", method=method, path=path, status=resp.status_code,
                  instance=resp.headers.get("x-backend-id"), body=parsed)
        return resp.status_code, parsed

    def emit_ack(self, event, data):
        """Emits with an ack and waits for it; prints an 'ack' line; returns whether it said ok."""
        try:
            reply = self.sio.call(event, data, timeout=ACK_TIMEOUT)
        except Exception as exc:  # socketio.exceptions.TimeoutError, BadNamespaceError, ...
            emit_line("ack", event=event, ok=False, data=None, error=f"{type(exc).__name__}: {exc}")
            return False
        ok = isinstance(reply, dict) and reply.get("ok") is True
        emit_line("ack", event=event, ok=ok, data=reply)
        return ok

    def expectations_met(self):
        a = self.args
        if a.expect is not None:
            others = sum(n for e, n in self.received.items() if e != "hello")
            if others < a.expect:
                return False
        return all(self.received.get(e, 0) >= n for e, n in a.expected.items())

    def has_expectations(self):
        return self.args.expect is not None or bool(self.args.expected)

    # --- the run ------------------------------------------------------------------------------

    def script(self):
        """Login, HTTP steps, connect, joins, watchDrivers, locations. Returns False on a fatal
        error."""
        a = self.args
        if not a.no_login:
            status, _ = self.call("POST", "/login", {"name": a.name, "role": a.role})
            if status != 200:
                self.error(f"login failed: HTTP {status}")
                return False
        if a.request_ride:
            status, body = self.call("POST", "/rides", {"from": a.request_ride[0],
                                                        "to": a.request_ride[1]})
            if status != 201:
                self.error(f"POST /rides failed: HTTP {status}")
                return False
            self.created_ride = body
            emit_line("ride", ride=body)
        if a.accept:
            status, _ = self.call("POST", f"/rides/{a.accept}/accept")
            if status != 200:
                self.error(f"accepting {a.accept} failed: HTTP {status}")
                return False

        if not self.connect():
            return False

        joins = list(a.join)
        if a.join_created and self.created_ride:
            joins.insert(0, self.created_ride["id"])
        for ride_id in joins:
            if not self.emit_ack("joinRide", {"rideId": ride_id}):
                self.error(f"joinRide {ride_id} refused")
                return False
        if a.watch_drivers and not self.emit_ack("watchDrivers", None):
            self.error("watchDrivers refused")
            return False
        if a.send_locations:
            if not joins:
                self.error("--send-locations needs a ride: --join or --join-created")
                return False
            for i in range(a.send_locations):
                lat, lng = 48.85 + i * 0.001, 2.35 + i * 0.001
                if not self.emit_ack("locationUpdate",
                                     {"rideId": joins[0], "lat": lat, "lng": lng}):
                    self.error(f"locationUpdate {i + 1} refused")
                    return False
                if i + 1 < a.send_locations:
                    time.sleep(a.interval)
        return True

    def connect(self):
        """Connects; returns False (with the reason recorded) if that fails or takes too long."""
        a = self.args
        outcome = {}

        def attempt():
            try:
                self.sio.connect(self.base, transports=a.transports,
                                 socketio_path=a.socketio_path,
                                 wait_timeout=max(1.0, min(10.0, self.remaining())))
                outcome["ok"] = True
            except socketio.exceptions.ConnectionError as exc:
                outcome["error"] = f"connect failed: {exc}"

        # After a refused connection python-engineio can wait for its pending long-poll to end
        # (up to the server's ping interval) before connect() returns: once the refusal is
        # known, give it a moment and then report without waiting for that.
        if not run_bounded(attempt, self.remaining,
                           give_up=lambda: any(e.startswith("connect_error")
                                               for e in self.errors)):
            refused = any(e.startswith("connect_error") for e in self.errors)
            outcome.setdefault("error", "connect failed: " + (
                "the server refused the connection" if refused
                else f"no connection within the deadline ({a.timeout}s)"))
        if "error" in outcome:
            self.error(outcome["error"])
            return False
        return True

    def remaining(self):
        return max(0.0, self.deadline - time.monotonic())

    def run_stdin(self):
        for line in sys.stdin:
            words = shlex.split(line.strip())
            if not words:
                continue
            cmd, rest = words[0], words[1:]
            try:
                if cmd == "quit":
                    return
                elif cmd == "join" and len(rest) == 1:
                    self.emit_ack("joinRide", {"rideId": rest[0]})
                elif cmd == "location" and len(rest) == 3:
                    self.emit_ack("locationUpdate",
                                  {"rideId": rest[0], "lat": float(rest[1]), "lng": float(rest[2])})
                elif cmd == "watch" and not rest:
                    self.emit_ack("watchDrivers", None)
                elif cmd == "position" and len(rest) == 2:
                    self.emit_ack("driverPosition", {"lat": float(rest[0]), "lng": float(rest[1])})
                elif cmd == "emit" and len(rest) in (1, 2):
                    self.emit_ack(rest[0], json.loads(rest[1]) if len(rest) == 2 else None)
                elif cmd == "http" and len(rest) in (2, 3):
                    self.call(rest[0].upper(), rest[1], json.loads(rest[2]) if len(rest) == 3 else None)
                else:
                    emit_line("error", message=f"unknown command: {line.strip()}")
            except ValueError as exc:
                emit_line("error", message=f"bad command {line.strip()!r}: {exc}")

    def wait_expectations(self):
        """Waits for the expected events; returns False on timeout or disconnect."""
        with self.cond:
            while not self.expectations_met():
                left = self.remaining()
                if left <= 0 or not self.sio.connected:
                    return False
                self.cond.wait(timeout=min(left, 0.5))
        return True

    def main(self):
        code = 0
        if not self.script():
            code = 1
        elif self.args.stdin:
            self.run_stdin()
        elif self.has_expectations() and not self.wait_expectations():
            missing = {e: n for e, n in self.args.expected.items()
                       if self.received.get(e, 0) < n}
            self.error(f"timed out after {self.args.timeout}s waiting for events "
                       f"(still missing: {missing or self.args.expect})")
            code = 3
        if self.args.stdin and self.has_expectations() and not self.expectations_met():
            code = code or 3
        sid = self.sio.get_sid() if self.sio.connected else None

        def disconnect():
            self.closing = True
            try:
                self.sio.disconnect()
            except Exception:  # already gone
                pass

        # Same as in connect(): with polling, disconnect() may wait for a long-poll to end.
        end = time.monotonic() + 3.0
        run_bounded(disconnect, lambda: end - time.monotonic())
        if code == 0 and self.errors:
            code = 1
        emit_line("summary", ok=code == 0, exit=code, received=self.received,
                  errors=self.errors, sid=sid, name=self.args.name, role=self.args.role)
        return code


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    run = Run(args)
    try:
        code = run.main()
    except KeyboardInterrupt:
        code = 1
    sys.stdout.flush()
    # Leave at once: the client's background threads must not keep the process alive.
    import os
    os._exit(code)


if __name__ == "__main__":
    main()
