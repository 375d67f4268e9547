"""Malformed HTTP/2 against s2s-proxy (SECURITY.md catalogue D10-D13, E7-E8).

Usage: attacks.py HOST:PORT AUTHORIZATION-VALUE
Prints one JSON object per case: {"case": ..., "outcome": ...} where outcome is
"status:<code>", "reset:<error code>", "goaway:<error code>", "closed" or "timeout".
The Rust test (tests/h2_attacks.rs) decides what each case must produce.
"""

import json
import socket
import sys
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from hyperframe.frame import ContinuationFrame, HeadersFrame

HOST, PORT = sys.argv[1].rsplit(":", 1)
AUTH = sys.argv[2]
TIMEOUT = 3.0


def connect():
    sock = socket.create_connection((HOST, int(PORT)), timeout=TIMEOUT)
    config = h2.config.H2Configuration(
        client_side=True,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=False,
        header_encoding=None,
    )
    conn = h2.connection.H2Connection(config=config)
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


def base(path, method="GET", extra=()):
    headers = [(":method", method), (":scheme", "http"), (":authority", "proxy"), (":path", path)]
    headers.append(("authorization", AUTH))
    headers.extend(extra)
    return headers


def outcome(sock, conn, stream_id=1):
    deadline = time.time() + TIMEOUT
    status = None
    while time.time() < deadline:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            break
        except OSError:
            return "closed"
        if not data:
            return status or "closed"
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            return status or "closed"
        for event in events:
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                for name, value in event.headers:
                    if name in (b":status", ":status"):
                        status = "status:" + (value.decode() if isinstance(value, bytes) else value)
            elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream_id:
                return status or "reset:%d" % int(event.error_code)
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                return status or "ended"
            elif isinstance(event, h2.events.ConnectionTerminated):
                return status or "goaway:%d" % int(event.error_code)
        try:
            sock.sendall(conn.data_to_send())
        except OSError:
            return status or "closed"
    return status or "timeout"


def headers_case(headers, end_stream=True, body=None):
    sock, conn = connect()
    try:
        conn.send_headers(1, headers, end_stream=end_stream and body is None)
        if body is not None:
            conn.send_data(1, body, end_stream=True)
        sock.sendall(conn.data_to_send())
        return outcome(sock, conn)
    finally:
        sock.close()


def raw_frames_case(frames):
    """Sends pre-encoded frames after the preface and SETTINGS."""
    sock, conn = connect()
    try:
        for frame in frames:
            sock.sendall(frame)
        return outcome(sock, conn)
    finally:
        sock.close()


def rapid_reset():
    sock, conn = connect()
    try:
        for i in range(200):
            stream_id = 1 + 2 * i
            conn.send_headers(stream_id, base(p("reset")), end_stream=True)
            conn.reset_stream(stream_id)
        sock.sendall(conn.data_to_send())
        result = outcome(sock, conn, stream_id=-1)
    finally:
        sock.close()
    # The server must still serve a fresh connection.
    return result + "|then:" + headers_case(base(p("after-reset")))


def continuation_flood():
    sock, conn = connect()
    encoded = conn.encoder.encode(base(p("continuation")))
    frames = [HeadersFrame(1, data=encoded[:10], flags=["END_STREAM"]).serialize()]
    frames += [ContinuationFrame(1, data=b"\x40\x01a\x01b").serialize() for _ in range(5000)]
    try:
        for frame in frames:
            sock.sendall(frame)
        return outcome(sock, conn)
    except OSError:
        return "closed"
    finally:
        sock.close()


def p(name):
    return "/bc/" + name


CASES = {
    "cl0_with_smuggled_data": lambda: headers_case(
        base(p("cl0"), "POST", [("content-length", "0")]), body=b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"),
    "cl_larger_than_data": lambda: headers_case(base(p("cl10"), "POST", [("content-length", "10")]), body=b"abc"),
    "transfer_encoding": lambda: headers_case(
        base(p("te"), "POST", [("transfer-encoding", "chunked")]), body=b"0\r\n\r\n"),
    "connection_header": lambda: headers_case(base(p("connection"), extra=[("connection", "keep-alive")])),
    "te_gzip": lambda: headers_case(base(p("tegzip"), extra=[("te", "gzip")])),
    "upgrade_header": lambda: headers_case(base(p("upgrade"), extra=[("upgrade", "h2c")])),
    "path_without_slash": lambda: headers_case(base(path="bc/noslash")),
    "empty_path": lambda: headers_case(base(path="")),
    "missing_scheme": lambda: headers_case([h for h in base(p("noscheme")) if h[0] != ":scheme"]),
    "pseudo_after_regular": lambda: headers_case(
        [(":method", "GET"), ("authorization", AUTH), (":scheme", "http"), (":authority", "p"), (":path", p("pseudo"))]),
    "method_with_crlf": lambda: headers_case(base(p("crlfmethod"), method="GET /admin HTTP/1.1\r\nX:")),
    "uppercase_header": lambda: headers_case(base(p("upper"), extra=[("X-Upper", "1")])),
    "crlf_in_value": lambda: headers_case(base(p("crlfvalue"), extra=[("x-a", "b\r\nx-injected: 1")])),
    "connect_method": lambda: headers_case(
        [(":method", "CONNECT"), (":authority", "169.254.169.254:80"), ("authorization", AUTH)]),
    "trace_method": lambda: headers_case(base(p("trace"), method="TRACE")),
    "dot_dot_path": lambda: headers_case(base(path="/bc/../crm/x")),
    "encoded_slash": lambda: headers_case(base(path="/bc/..%2fcrm")),
    "duplicate_authorization": lambda: headers_case(base(p("dupauth"), extra=[("authorization", "Bearer evil")])),
    "no_credentials": lambda: headers_case([h for h in base(p("nocreds")) if h[0] != "authorization"]),
    "authority_mismatch": lambda: headers_case(
        [(":method", "GET"), (":scheme", "http"), (":authority", "evil.test"), (":path", p("mismatch")),
         ("host", "proxy"), ("authorization", AUTH)]),
    "authority_only": lambda: headers_case(
        [(":method", "GET"), (":scheme", "http"), (":authority", "evil.test"), (":path", p("authority")),
         ("authorization", AUTH)]),
    "authority_userinfo": lambda: headers_case(
        [(":method", "GET"), (":scheme", "http"), (":authority", "admin:pw@proxy"), (":path", p("userinfo")),
         ("authorization", AUTH)]),
    "scheme_not_http": lambda: headers_case(
        [(":method", "GET"), (":scheme", "ftp"), (":authority", "proxy"), (":path", p("scheme")),
         ("authorization", AUTH)]),
    "rapid_reset": rapid_reset,
    "continuation_flood": continuation_flood,
}

for name, run in CASES.items():
    try:
        result = run()
    except Exception as error:  # noqa: BLE001 - the outcome is what matters
        result = "error:" + type(error).__name__
    print(json.dumps({"case": name, "outcome": result}), flush=True)
