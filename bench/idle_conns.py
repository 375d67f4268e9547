#!/usr/bin/env python3
"""Open N keep-alive connections to s2s-proxy, send one authenticated request on each,
then hold them idle and report the proxy's memory from /proc.

usage: idle_conns.py HOST PORT PATH AUTH_HEADER PROXY_PID N
Prints one line of key=value pairs. With IDLE_NO_REQUEST=1 the connections send nothing
(the proxy closes them after header_read_timeout, so the reading is taken before that)."""
import asyncio
import os
import resource
import sys


def status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0])  # kB
    return out


def nfds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


async def one(host, port, request, held, failures):
    try:
        reader, writer = await asyncio.open_connection(host, port)
        if not request:  # IDLE_NO_REQUEST: connected, nothing sent
            held.append(writer)
            return
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        if length:
            await reader.readexactly(length)
        if not head.startswith(b"HTTP/1.1 200"):
            failures.append(head.split(b"\r\n", 1)[0])
        held.append(writer)
    except Exception as e:  # noqa: BLE001 - counted and reported
        failures.append(repr(e))


async def main():
    host, port, path, auth, pid, n = sys.argv[1:7]
    port, n = int(port), int(n)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 1024
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
               f"Authorization: {auth}\r\n\r\n").encode()
    if os.environ.get("IDLE_NO_REQUEST"):
        request = b""
    before = status(pid)
    held, failures = [], []
    batch = 250  # bounded concurrency: the upstream pool stays small, as in steady state
    for start in range(0, n, batch):
        await asyncio.gather(*(one(host, port, request, held, failures)
                               for _ in range(min(batch, n - start))))
    await asyncio.sleep(2)  # let allocators settle
    after = status(pid)
    print(f"open={len(held)} failures={len(failures)} proxy_fds={nfds(pid)} "
          f"rss_before_kib={before['VmRSS']} rss_idle_conns_kib={after['VmRSS']} "
          f"hwm_kib={after['VmHWM']}"
          + (f" first_failure={failures[0]!r}" if failures else ""))
    for w in held:
        w.close()


asyncio.run(main())
