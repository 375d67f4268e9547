#!/usr/bin/env python3
"""Upload sink: an HTTP/1.1 server that reads request bodies (Content-Length or chunked)
without storing them and answers 200 with the byte count. usage: sink.py PORT"""
import socket
import sys
import threading

BUF = 1 << 20


def recv_exact_discard(conn, n, pre):
    got = len(pre)
    buf = bytearray(BUF)
    while got < n:
        r = conn.recv_into(buf, min(BUF, n - got))
        if not r:
            raise ConnectionError("eof")
        got += r
    return got


def read_line(conn, pending):
    while b"\r\n" not in pending:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("eof")
        pending += chunk
    line, _, rest = pending.partition(b"\r\n")
    return line, rest


def handle(conn):
    with conn:
        pending = b""
        while True:
            while b"\r\n\r\n" not in pending:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                pending += chunk
            head, _, pending = pending.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            hdrs = {}
            for line in lines[1:]:
                k, _, v = line.partition(b":")
                hdrs[k.strip().lower()] = v.strip()
            total = 0
            if b"content-length" in hdrs:
                n = int(hdrs[b"content-length"])
                if len(pending) >= n:
                    total, pending = n, pending[n:]
                else:
                    total = recv_exact_discard(conn, n, pending)
                    pending = b""
            elif hdrs.get(b"transfer-encoding", b"").lower() == b"chunked":
                while True:
                    line, pending = read_line(conn, pending)
                    size = int(line.split(b";")[0], 16)
                    if size == 0:
                        _, pending = read_line(conn, pending)
                        break
                    need = size + 2
                    if len(pending) >= need:
                        pending = pending[need:]
                    else:
                        recv_exact_discard(conn, need, pending)
                        pending = b""
                    total += size
            body = f'{{"received":{total}}}'.encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


def main():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(sys.argv[1])))
    s.listen(64)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


main()
