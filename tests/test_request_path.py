"""Regressions from the hardening review on the request path: malformed streaming replies,
the overhead header on streams, and what an unexpected exception leaves in the log."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from quota_proxy.asgi import Receive, Scope, Send, send_bytes
from quota_proxy.fake_upstream import HTML_PAGE
from quota_proxy.runner import run_server
from tests.conftest import GatewayFactory, GatewayHarness
from tests.test_streaming import chat, request_row, settled_row, setup

pytestmark = pytest.mark.anyio


async def test_html_200_to_a_streaming_request_is_a_502_and_charges_nothing(gateway: GatewayHarness) -> None:
    _, http, auth = await setup(gateway)
    before = await gateway.balance()
    for stream in (True, False):
        response = await http.post(
            "/v1/chat/completions", json=chat(stream=stream, fake={"fail": "html"}), headers=auth
        )
        assert response.status_code == 502, response.text
        assert response.headers["content-type"].startswith("application/json")
        assert response.json()["error"]["code"] == "upstream_error"
        assert b"<html>" not in response.content
        row = await settled_row(gateway, response.headers["x-quota-request-id"])
        assert (row["charged"], row["outcome"]) == (0, "upstream_malformed")
    assert await gateway.balance() == before
    await gateway.verify()


async def html_server(scope: Scope, receive: Receive, send: Send) -> None:
    """A reverse proxy in front of a dead model server: 200 and an HTML page, always."""
    if scope["type"] == "http":
        await send_bytes(send, 200, HTML_PAGE, content_type=b"text/html")


async def test_a_malformed_stream_falls_back_to_the_next_upstream(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    async with run_server(html_server) as proxy:
        routes = "\n".join(
            [
                "[upstreams.html]",
                f'base_url = "{proxy.url}/v1"',
                '[routes."quota/fallback"]',
                'upstreams = ["html", "fake"]',
                'model = "fake-fallback"',
                "multiplier = 1",
                "max_output_tokens = 64",
            ]
        )
        gateway: GatewayHarness = await make_gateway(routes=routes)
        _, http, auth = await setup(gateway)
        response = await http.post("/v1/chat/completions", json=chat("quota/fallback"), headers=auth)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert b"data: [DONE]" in response.content
        row = await settled_row(gateway, response.headers["x-quota-request-id"])
        assert row["outcome"] == "ok" and row["charged"] > 0
        await gateway.verify()


async def test_stream_overhead_excludes_the_upstreams_time_to_first_byte(gateway: GatewayHarness) -> None:
    _, http, auth = await setup(gateway)
    for stream in (True, False):
        async with http.stream(
            "POST", "/v1/chat/completions", json=chat(stream=stream, fake={"first_byte_delay_s": 0.4}), headers=auth
        ) as response:
            assert response.status_code == 200
            overhead = float(response.headers["x-quota-overhead-ms"])
            await response.aread()
        assert 0 <= overhead < 300, (stream, overhead, "the upstream's 400 ms is not the gateway's overhead")


async def test_an_unexpected_exception_logs_its_frames_once_without_the_prompt(
    gateway: GatewayHarness, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any bug on the request path: a JSON 500, and one error line with the traceback's
    frames, never the message (which could quote the prompt) nor the key."""
    key, http, auth = await setup(gateway)
    secret_prompt = "my-very-secret-prompt"

    def broken(*args: object, **kwargs: object) -> int:
        raise RuntimeError(f"boom while reading {secret_prompt}")

    monkeypatch.setattr("quota_proxy.inference_request.estimate_prompt_tokens", broken)
    with caplog.at_level(logging.ERROR, logger="quota_proxy.error"):
        response = await http.post(
            "/v1/chat/completions",
            json={"model": "quota/fast", "messages": [{"role": "user", "content": secret_prompt}]},
            headers=auth,
        )
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    errors = [r for r in caplog.records if r.name == "quota_proxy.error"]
    assert len(errors) == 1
    text = errors[0].getMessage()
    assert "Traceback" in text and "inference_request.py" in text and "RuntimeError" in text
    assert secret_prompt not in text and key not in text
    assert response.headers["x-quota-request-id"] in text


async def test_the_charge_is_written_before_the_answer_ends(gateway: GatewayHarness) -> None:
    """A caller who has read the whole answer, stream or not, sees its charge at once."""
    _, http, auth = await setup(gateway)
    for stream in (True, False):
        before = await gateway.balance()
        response = await http.post("/v1/chat/completions", json=chat(stream=stream), headers=auth)
        assert response.status_code == 200
        row = await request_row(gateway, response.headers["x-quota-request-id"])  # no waiting
        assert row is not None and row["charged"] > 0, stream
        assert await gateway.balance() == before - row["charged"]
        account = await gateway.store.account_by_name("acme")
        assert account is not None and account.held == 0
