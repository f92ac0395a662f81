"""A light open-connection load generator for the overload test, run as its own process.

One asyncio loop drives every connection (raw HTTP/1.1 keep-alive on asyncio streams), so the
client measures the server, not its own thread scheduling: 32 Python threads fighting over the
GIL on a 2-core machine add tens of milliseconds to what they measure.

    python tests/async_load.py HOST PORT BODY_FILE CLIENTS DURATION_S BACKOFF_S [CPU]

prints one JSON list of [status, milliseconds] pairs.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time


async def _client(host: str, port: int, request: bytes, stop_at: float, backoff_s: float,
                  out: list[tuple[int, float]]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            writer.write(request)
            await writer.drain()
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
            out.append((status, (time.perf_counter() - t0) * 1e3))
            if status != 200:
                await asyncio.sleep(backoff_s)  # a polite client pauses after a rejection
    finally:
        writer.close()


async def run(host: str, port: int, body: bytes, clients: int, duration_s: float,
              backoff_s: float) -> list[tuple[int, float]]:
    head = (f"POST /v1/score HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    request = head.encode() + body
    stop_at = time.monotonic() + duration_s
    out: list[tuple[int, float]] = []
    await asyncio.wait_for(
        asyncio.gather(*(_client(host, port, request, stop_at, backoff_s, out)
                         for _ in range(clients))),
        timeout=duration_s + 30,
    )
    return out


def main() -> None:
    host, port, body_file, clients, duration_s, backoff_s = sys.argv[1:7]
    if len(sys.argv) > 7 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(sys.argv[7])})
    with open(body_file, "rb") as f:
        body = f.read()
    results = asyncio.run(run(host, int(port), body, int(clients), float(duration_s),
                              float(backoff_s)))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
