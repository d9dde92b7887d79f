"""The server's own answers, on raw sockets against a real `quota-proxy serve` (issue 9, items
3 and 10): malformed requests, oversized headers, the connection cap, and slow clients, each
answered in SPEC §3's JSON shape or closed in time."""

from __future__ import annotations

import socket
import statistics
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest
import uvicorn

from quota_proxy.http_protocol import GatewayConfig
from tests.serving import parse_response, raw_exchange, serving

pytestmark = pytest.mark.anyio

GET = b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\n"

# (name, bytes sent, status, code)
MALFORMED = [
    ("control byte in a header value", GET + b"X-Note: a\x01b\r\n\r\n", 400, "bad_request"),
    ("space in a header name", GET + b"Bad Name: v\r\n\r\n", 400, "bad_request"),
    ("non-ASCII header name", GET + b"X-\xc3\xa9t\xc3\xa9: v\r\n\r\n", 400, "bad_request"),
    ("bad request line", b"GARBAGE\r\n\r\n", 400, "bad_request"),
    ("unknown HTTP version", b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n", 400, "bad_request"),
    ("non-ASCII path", b"GET /v1/\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
    ("bad chunk size", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
     400, "bad_request"),
    ("content-length and chunked", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "bad_request"),
    ("headers over max_header_bytes", GET + b"X-Junk: " + b"j" * 40_000 + b"\r\n\r\n", 431, "headers_too_large"),
    ("1 MiB of headers", GET + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(1024)) + b"\r\n",
     431, "headers_too_large"),
]


def assert_spec_error(raw: bytes, status: int, code: str) -> None:
    response = parse_response(raw)
    assert response.status == status, raw[:300]
    assert response.headers["content-type"] == "application/json"
    assert response.headers["connection"] == "close"
    assert response.headers["x-quota-request-id"].startswith("req_")
    assert int(response.headers["content-length"]) == len(response.body)
    error = orjson.loads(response.body)["error"]
    assert error["code"] == code and error["message"] and error["type"] == (
        "api_error" if status >= 500 else "invalid_request_error"
    )


async def test_protocol_errors_are_spec_json(tmp_path: Path) -> None:
    async with serving(tmp_path, max_header_bytes=32_768) as served:
        for name, data, status, code in MALFORMED:
            raw = await anyio.to_thread.run_sync(raw_exchange, served.port, data)
            try:
                assert_spec_error(raw, status, code)
            except (AssertionError, ValueError, KeyError) as exc:
                raise AssertionError(f"{name}: {raw[:300]!r}") from exc
        # A byte outside ASCII in a header value is legal HTTP (obs-text): served as usual.
        raw = await anyio.to_thread.run_sync(
            raw_exchange, served.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Note: caf\xe9\r\nConnection: close\r\n\r\n"
        )
        assert parse_response(raw).status == 200
        # Headers just under the limit are fine, and the gateway keeps serving.
        async with httpx.AsyncClient(base_url=served.url) as client:
            ok = await client.get("/v1/models", headers={**served.auth, "x-pad": "p" * 30_000})
            assert ok.status_code == 200
        assert "Traceback" not in served.stderr()


async def test_connection_cap_answers_503_json(tmp_path: Path) -> None:
    async with serving(tmp_path, max_connections=4, header_timeout_s=30) as served:
        idle = [socket.create_connection(("127.0.0.1", served.port)) for _ in range(4)]
        try:
            await anyio.sleep(0.2)
            raw = await anyio.to_thread.run_sync(
                raw_exchange, served.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            assert_spec_error(raw, 503, "overloaded")
            assert parse_response(raw).headers["retry-after"] == "1"
            idle.pop().close()
            await anyio.sleep(0.2)
            # 3 idle + this one = 4: at the cap, not over it.
            raw = await anyio.to_thread.run_sync(
                raw_exchange, served.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert parse_response(raw).status == 200
        finally:
            for s in idle:
                s.close()


SLOW_CLIENTS = 60
HEADER_TIMEOUT_S = 1.0


async def test_slow_clients_are_cut_off_and_do_not_stop_others(tmp_path: Path) -> None:
    """SLOW_CLIENTS slowloris connections (a header byte every 0.1 s, never finishing) and
    one idle connection: normal requests are served meanwhile, and each slow connection is
    answered 408 and closed about header_timeout_s after it opened."""
    async with serving(tmp_path, header_timeout_s=HEADER_TIMEOUT_S) as served:
        closed_after: list[float] = []
        answers: list[bytes] = []

        async def slowloris() -> None:
            opened = time.monotonic()
            request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 1000
            async with await anyio.connect_tcp("127.0.0.1", served.port) as stream:
                received = b""
                with anyio.move_on_after(HEADER_TIMEOUT_S + 5):
                    for i in range(len(request)):
                        try:
                            await stream.send(request[i : i + 1])
                            with anyio.move_on_after(0.1):
                                chunk = await stream.receive()
                                received += chunk
                        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                            break
                closed_after.append(time.monotonic() - opened)
                answers.append(received)

        idle = socket.create_connection(("127.0.0.1", served.port))
        latencies: list[float] = []
        statuses: list[int] = []
        async with anyio.create_task_group() as tg:
            for _ in range(SLOW_CLIENTS):
                tg.start_soon(slowloris)
            await anyio.sleep(0.3)
            async with httpx.AsyncClient(base_url=served.url, timeout=5) as client:
                for _ in range(10):
                    started = time.monotonic()
                    r = await client.post(
                        "/v1/chat/completions",
                        json={"model": "quota/fast", "messages": [{"role": "user", "content": "hi"}]},
                        headers=served.auth,
                    )
                    statuses.append(r.status_code)
                    latencies.append(time.monotonic() - started)
                    await anyio.sleep(0.05)
        idle.settimeout(3)
        assert idle.recv(1) == b""  # the idle connection was closed, with nothing said
        idle.close()

    assert statuses == [200] * 10
    assert max(latencies) < 1.0, latencies
    assert len(closed_after) == SLOW_CLIENTS
    for raw in answers:
        assert_spec_error(raw, 408, "request_timeout")
    assert min(closed_after) >= HEADER_TIMEOUT_S - 0.05, closed_after
    assert max(closed_after) < HEADER_TIMEOUT_S + 1.5, closed_after
    print(
        f"\n{SLOW_CLIENTS} slow clients: closed after {min(closed_after):.2f}-{max(closed_after):.2f} s "
        f"(header_timeout_s={HEADER_TIMEOUT_S}); 10 completions meanwhile: median "
        f"{statistics.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms"
    )


async def test_a_kept_alive_connection_gets_the_header_deadline_per_request(tmp_path: Path) -> None:
    async with serving(tmp_path, header_timeout_s=HEADER_TIMEOUT_S) as served:
        with socket.create_connection(("127.0.0.1", served.port), timeout=5) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            first = s.recv(65536)
            assert parse_response(first).status == 200
            await anyio.sleep(HEADER_TIMEOUT_S * 1.5)  # longer than the deadline, shorter than keep-alive
            started = time.monotonic()
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
            waited = time.monotonic() - started
    assert_spec_error(raw, 408, "request_timeout")
    assert HEADER_TIMEOUT_S - 0.05 <= waited < HEADER_TIMEOUT_S + 1.0, waited



async def test_an_error_escaping_the_app_is_a_json_500() -> None:
    """The gateway's own middleware answers its errors; an exception that escapes any app
    served by GatewayProtocol is still answered in JSON, not uvicorn's text/plain 500."""

    async def broken(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raise RuntimeError("boom")

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = GatewayConfig(broken, lifespan="off", log_config=None, log_level="critical", loop="none")
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        while not server.started:
            await anyio.sleep(0.01)
        raw = await anyio.to_thread.run_sync(
            raw_exchange, sock.getsockname()[1], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        server.should_exit = True
    sock.close()
    assert_spec_error(raw, 500, "internal_error")


async def test_garbage_after_a_request_lets_its_stream_finish(tmp_path: Path) -> None:
    """Bytes that cannot be parsed arrive while a stream is being written on the same
    connection: the stream finishes intact, then the connection closes (no error written
    into the middle of it)."""
    async with serving(tmp_path) as served:
        body = orjson.dumps({"model": "quota/fast", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                             "fake": {"chunk_delay_s": 0.05, "reply_words": 10}})
        request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Authorization: Bearer " + served.key.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

        def exchange() -> bytes:  # in a thread: the fake upstream runs in this event loop
            with socket.create_connection(("127.0.0.1", served.port), timeout=10) as s:
                s.sendall(request)
                received = s.recv(65536)
                assert received.startswith(b"HTTP/1.1 200"), received
                s.sendall(b"GARBAGE\r\n\r\n")
                while chunk := s.recv(65536):
                    received += chunk
                return received

        received = await anyio.to_thread.run_sync(exchange)
    assert received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"), received[-200:]
    assert b"bad_request" not in received
