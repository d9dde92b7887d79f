"""A small HTTP/1.1 keep-alive client on uvloop for what wrk cannot see.

wrk gives throughput and whole-response latency; this measures the time to the first
byte of a streamed answer (response head, and first `data:` event), and runs passes of
an exact number of requests, so that the mock's request counter can be compared with
the client's count exactly (wrk stops mid-flight, this client never does).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass
class Result:
    status: int
    t_head: float  # seconds from writing the request to the end of the response head
    t_first: float  # ... to the first body bytes holding "data:" (or the first body bytes)
    t_end: float
    body: bytes


@dataclass
class PassResult:
    requests: int = 0
    good: int = 0
    non200: int = 0
    bad: int = 0
    errors: int = 0
    sample: str = ""
    ttfb_head: list[float] = field(default_factory=list)
    ttfb_first: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    wall_s: float = 0.0


def build_request(host: str, port: int, path: str, body: bytes, auth: str | None,
                  headers: dict[str, str] | None = None) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "User-Agent: quota-bench/1",
    ]
    if auth:
        lines.append(f"Authorization: Bearer {auth}")
    lines.extend(f"{name}: {value}" for name, value in (headers or {}).items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> Result:
    t0 = time.perf_counter()
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    t_head = time.perf_counter() - t0
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = None
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    t_first = 0.0
    parts: list[bytes] = []
    if chunked:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers are sent by anyone here
                break
            data = await reader.readexactly(size + 2)
            if not t_first and b"data:" in data:
                t_first = time.perf_counter() - t0
            parts.append(data[:-2])
    else:
        data = await reader.readexactly(length or 0)
        t_first = time.perf_counter() - t0
        parts.append(data)
    t_end = time.perf_counter() - t0
    return Result(status, t_head, t_first or t_end, t_end, b"".join(parts))


async def run_pass(
    host: str,
    port: int,
    path: str,
    body: bytes,
    auth: str | None,
    expect: tuple[bytes, ...],
    concurrency: int,
    *,
    count: int | None = None,
    duration_s: float | None = None,
    timeout_s: float = 30.0,
    headers: dict[str, str] | None = None,
) -> PassResult:
    """Send exactly `count` requests (or as many as fit in duration_s, each one finished)."""
    request = build_request(host, port, path, body, auth, headers)
    out = PassResult()
    issued = 0
    deadline = time.perf_counter() + (duration_s or 1e9)

    def take() -> bool:
        nonlocal issued
        if count is not None and issued >= count:
            return False
        if duration_s is not None and time.perf_counter() >= deadline:
            return False
        issued += 1
        return True

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while take():
                try:
                    r = await asyncio.wait_for(one(reader, writer, request), timeout_s)
                except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    out.requests += 1
                    out.errors += 1
                    out.sample = out.sample or f"{type(exc).__name__}: {exc}"
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                    continue
                out.requests += 1
                if r.status != 200:
                    out.non200 += 1
                    out.sample = out.sample or f"{r.status} {r.body[:300]!r}"
                    continue
                missing = [e for e in expect if e not in r.body]
                if missing:
                    out.bad += 1
                    out.sample = out.sample or f"200 missing {missing[0]!r}: {r.body[:300]!r}"
                    continue
                out.good += 1
                out.ttfb_head.append(r.t_head)
                out.ttfb_first.append(r.t_first)
                out.total.append(r.t_end)
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    out.wall_s = time.perf_counter() - started
    return out


def run_pass_sync(*args: object, **kwargs: object) -> PassResult:
    try:
        import uvloop

        return uvloop.run(run_pass(*args, **kwargs))  # type: ignore[arg-type]
    except ImportError:
        return asyncio.run(run_pass(*args, **kwargs))  # type: ignore[arg-type]
