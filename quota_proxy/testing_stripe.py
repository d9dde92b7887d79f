"""A fake Stripe for tests and local trials, run as its own process:

    python -m quota_proxy.testing_stripe --api-key sk_test_x --webhook-secret whsec_x [--port 0]

It implements exactly the Stripe API the gateway calls — `POST /v1/checkout/sessions`
(form-encoded, Bearer auth, Idempotency-Key) — with Stripe's field names and error shapes,
a hosted "checkout page" at each session's `url`, and sends webhook events the way Stripe
does: JSON body, `Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "t.body")>`.

Tests drive it through `/_test/…` control endpoints (JSON):

    POST /_test/configure            {"webhook_url"}
    GET  /_test/sessions             every session created, with the params it was created with
    POST /_test/sessions/{id}/pay    {"deliver": true}   -> checkout.session.completed (paid)
    POST /_test/sessions/{id}/expire                      -> checkout.session.expired
    POST /_test/charges/{id}/refund  {"amount": cents}    -> charge.refunded (amount_refunded cumulative)
    POST /_test/events               {"type", "object"}   -> a new event about any object
    POST /_test/events/{id}/deliver  {"times", "concurrent", "signature": "valid"|"forged"|"none"|"empty_secret",
                                      "timestamp_offset_s"}  -> the HTTP statuses the webhook answered
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import httpx
import orjson

from quota_proxy.asgi import Receive, Scope, Send, send_bytes, send_json
from quota_proxy.runner import run_server

API_VERSION = "2025-09-30.clover"
SESSION_TTL_S = 24 * 3600

__all__ = ["FakeStripe", "RunningStripe", "main", "run_fake_stripe", "sign"]


def sign(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """A Stripe-Signature header value, as Stripe computes it."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def _id(prefix: str) -> str:
    return f"{prefix}_test_{os.urandom(12).hex()}"


def parse_form(body: bytes) -> dict[str, Any]:
    """Stripe's form encoding (`line_items[0][price_data][currency]=usd`) to nested JSON."""
    root: dict[str, Any] = {}
    for key, value in parse_qsl(body.decode(), keep_blank_values=True):
        head, _, rest = key.partition("[")
        parts = [head] + ([p.rstrip("]") for p in ("[" + rest).split("[")[1:]] if rest else [])
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    converted: dict[str, Any] = _lists(root)
    return converted


def _lists(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    converted = {k: _lists(v) for k, v in node.items()}
    if converted and all(k.isdigit() for k in converted):
        return [converted[k] for k in sorted(converted, key=int)]
    return converted


class StripeError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"error": {"message": message, "type": type}}
        if code:
            self.body["error"]["code"] = code
        if param:
            self.body["error"]["param"] = param


@dataclass
class FakeStripe:
    api_key: str
    webhook_secret: str
    webhook_url: str | None = None
    base_url: str = ""
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    charges: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    idempotent: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    deliveries: list[dict[str, Any]] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        method, path = scope["method"], scope["path"]
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        try:
            if path.startswith("/_test/"):
                status, data = await self._control(method, path, orjson.loads(body) if body else {})
                await send_json(send, status, data)
            elif path.startswith("/pay/"):
                await self._hosted_page(method, path, send)
            elif path.startswith("/v1/"):
                await self._api(method, path, headers, body, send)
            else:
                raise StripeError(404, f"Unrecognized request URL ({method}: {path}).")
        except StripeError as exc:
            await send_json(send, exc.status, exc.body)

    # -- the Stripe API ---------------------------------------------------------------

    async def _api(self, method: str, path: str, headers: dict[str, str], body: bytes, send: Send) -> None:
        auth = headers.get("authorization", "")
        if auth != f"Bearer {self.api_key}":
            raise StripeError(401, "Invalid API Key provided: " + (auth[7:15] + "****" if auth else "none"))
        if path == "/v1/checkout/sessions" and method == "POST":
            key = headers.get("idempotency-key")
            if key and key in self.idempotent:
                status, data = self.idempotent[key]
                await send_json(send, status, data, [(b"idempotent-replayed", b"true")])
                return
            data = self._create_session(parse_form(body))
            if key:
                self.idempotent[key] = (200, data)
            await send_json(send, 200, data, [(b"request-id", _id("req").encode())])
            return
        if path.startswith("/v1/checkout/sessions/") and method == "GET":
            session = self.sessions.get(path.rsplit("/", 1)[1])
            if session is None:
                raise StripeError(404, f"No such checkout.session: '{path.rsplit('/', 1)[1]}'",
                                  code="resource_missing", param="session")
            await send_json(send, 200, session)
            return
        raise StripeError(404, f"Unrecognized request URL ({method}: {path}).")

    def _create_session(self, params: dict[str, Any]) -> dict[str, Any]:
        mode = params.get("mode")
        if not mode:
            raise StripeError(400, "Missing required param: mode.", code="parameter_missing", param="mode")
        if mode != "payment":
            raise StripeError(400, f"Invalid mode: {mode}", code="parameter_invalid_string", param="mode")
        items = params.get("line_items")
        if not isinstance(items, list) or not items:
            raise StripeError(400, "Missing required param: line_items.", code="parameter_missing",
                              param="line_items")
        amount, currency = 0, None
        for i, item in enumerate(items):
            price = item.get("price_data") or {}
            try:
                unit, qty = int(price["unit_amount"]), int(item.get("quantity", "1"))
            except (KeyError, ValueError):
                raise StripeError(400, "Missing required param: line_items[0][price_data][unit_amount].",
                                  code="parameter_missing", param=f"line_items[{i}][price_data][unit_amount]") from None
            if not price.get("currency"):
                raise StripeError(400, "Missing required param: currency.", code="parameter_missing",
                                  param=f"line_items[{i}][price_data][currency]")
            if currency not in (None, price["currency"]):
                raise StripeError(400, "All line items must use the same currency.",
                                  param=f"line_items[{i}][price_data][currency]")
            amount += unit * qty
            currency = price["currency"]
        session_id = _id("cs")
        now = int(time.time())
        session = {
            "id": session_id,
            "object": "checkout.session",
            "amount_subtotal": amount,
            "amount_total": amount,
            "cancel_url": params.get("cancel_url"),
            "client_reference_id": params.get("client_reference_id"),
            "created": now,
            "currency": currency,
            "expires_at": now + SESSION_TTL_S,
            "livemode": False,
            "metadata": params.get("metadata") or {},
            "mode": mode,
            "payment_intent": None,
            "payment_status": "unpaid",
            "status": "open",
            "success_url": params.get("success_url"),
            "url": f"{self.base_url}/pay/{session_id}",
        }
        self.sessions[session_id] = session
        self.params[session_id] = params
        return session

    # -- the hosted checkout page -----------------------------------------------------

    async def _hosted_page(self, method: str, path: str, send: Send) -> None:
        session = self.sessions.get(path.removeprefix("/pay/"))
        if session is None:
            raise StripeError(404, "No such checkout session.")
        if method == "POST":
            if session["status"] == "open":
                await self.pay(session["id"])
            location = session["success_url"] or "/"
            await send({"type": "http.response.start", "status": 303,
                        "headers": [(b"location", location.encode()), (b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        total = f"{session['amount_total'] / 100:.2f} {session['currency'].upper()}"
        html = (
            "<!doctype html><html><head><meta charset='utf-8'><title>Fake Stripe Checkout</title><link rel='icon' href='data:,'></head>"
            f"<body><h1>Fake Stripe Checkout</h1><p id='total'>{total}</p>"
            f"<form method='post'><button id='pay' type='submit'>Pay {total}</button></form></body></html>"
        )
        await send_bytes(send, 200, html.encode(), content_type=b"text/html; charset=utf-8")

    # -- what happens on Stripe's side --------------------------------------------------

    async def pay(self, session_id: str, deliver: bool = True) -> dict[str, Any]:
        session = self._session(session_id)
        if session["status"] != "open":
            raise StripeError(400, f"This Checkout Session is {session['status']}.")
        intent, charge_id = _id("pi"), _id("ch")
        intent_metadata = (self.params[session_id].get("payment_intent_data") or {}).get("metadata") or {}
        session.update(status="complete", payment_status="paid", payment_intent=intent)
        self.charges[charge_id] = {
            "id": charge_id,
            "object": "charge",
            "amount": session["amount_total"],
            "amount_captured": session["amount_total"],
            "amount_refunded": 0,
            "currency": session["currency"],
            "metadata": dict(intent_metadata),
            "paid": True,
            "payment_intent": intent,
            "refunded": False,
            "status": "succeeded",
        }
        return await self.emit("checkout.session.completed", dict(session), deliver)

    async def expire(self, session_id: str, deliver: bool = True) -> dict[str, Any]:
        session = self._session(session_id)
        if session["status"] != "open":
            raise StripeError(400, f"This Checkout Session is {session['status']}.")
        session.update(status="expired")
        return await self.emit("checkout.session.expired", dict(session), deliver)

    async def refund(self, charge_id: str, amount: int | None, deliver: bool = True) -> dict[str, Any]:
        charge = self.charges.get(charge_id)
        if charge is None:
            raise StripeError(404, f"No such charge: '{charge_id}'", code="resource_missing")
        left = charge["amount"] - charge["amount_refunded"]
        amount = left if amount is None else amount
        if not 0 < amount <= left:
            raise StripeError(400, "Refund amount is greater than the unrefunded amount.",
                              code="amount_too_large", param="amount")
        charge["amount_refunded"] += amount
        charge["refunded"] = charge["amount_refunded"] == charge["amount"]
        return await self.emit("charge.refunded", dict(charge), deliver)

    def _session(self, session_id: str) -> dict[str, Any]:
        session = self.sessions.get(session_id)
        if session is None:
            raise StripeError(404, f"No such checkout.session: '{session_id}'", code="resource_missing")
        return session

    async def emit(self, event_type: str, obj: dict[str, Any], deliver: bool = True) -> dict[str, Any]:
        event_id = _id("evt")
        event: dict[str, Any] = {
            "id": event_id,
            "object": "event",
            "api_version": API_VERSION,
            "created": int(time.time()),
            "data": {"object": obj},
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": event_type,
        }
        self.events[event_id] = event
        statuses = await self.deliver(event_id) if deliver else []
        return {"event": event, "statuses": statuses}

    async def deliver(
        self,
        event_id: str,
        times: int = 1,
        concurrent: bool = False,
        signature: str = "valid",
        timestamp_offset_s: int = 0,
    ) -> list[int]:
        """POST the event to the webhook URL `times` times; the statuses it answered."""
        if self.webhook_url is None:
            raise StripeError(400, "No webhook endpoint configured (POST /_test/configure).")
        event = self.events.get(event_id)
        if event is None:
            raise StripeError(404, f"No such event: '{event_id}'", code="resource_missing")
        payload = orjson.dumps(event, option=orjson.OPT_INDENT_2)
        url = self.webhook_url

        def header() -> dict[str, str]:
            timestamp = int(time.time()) + timestamp_offset_s
            secret = {"valid": self.webhook_secret, "forged": "whsec_not_the_secret", "empty_secret": ""}
            value = sign(payload, secret[signature], timestamp) if signature in secret else ""
            headers = {"content-type": "application/json; charset=utf-8",
                       "user-agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)"}
            if value:
                headers["stripe-signature"] = value
            return headers

        async with httpx.AsyncClient(timeout=30) as client:

            async def once() -> int:
                try:
                    response = await client.post(url, content=payload, headers=header())
                    status = response.status_code
                except httpx.HTTPError:
                    status = 0
                self.deliveries.append({"event": event_id, "status": status})
                return status

            if concurrent:
                return list(await asyncio.gather(*(once() for _ in range(times))))
            return [await once() for _ in range(times)]

    # -- control ----------------------------------------------------------------------------

    async def _control(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        parts = path.removeprefix("/_test/").split("/")
        if parts == ["configure"] and method == "POST":
            self.webhook_url = body.get("webhook_url", self.webhook_url)
            return 200, {"webhook_url": self.webhook_url}
        if parts == ["sessions"] and method == "GET":
            return 200, {"data": [{"session": s, "params": self.params[i]} for i, s in self.sessions.items()]}
        if parts == ["charges"] and method == "GET":
            return 200, {"data": list(self.charges.values())}
        if len(parts) == 3 and parts[0] == "sessions" and method == "POST":
            deliver = bool(body.get("deliver", True))
            if parts[2] == "pay":
                return 200, await self.pay(parts[1], deliver)
            if parts[2] == "expire":
                return 200, await self.expire(parts[1], deliver)
        if len(parts) == 3 and parts[0] == "charges" and parts[2] == "refund" and method == "POST":
            return 200, await self.refund(parts[1], body.get("amount"), bool(body.get("deliver", True)))
        if parts == ["events"] and method == "POST":
            return 200, await self.emit(body["type"], body["object"], bool(body.get("deliver", True)))
        if len(parts) == 3 and parts[0] == "events" and parts[2] == "deliver" and method == "POST":
            statuses = await self.deliver(
                parts[1],
                times=int(body.get("times", 1)),
                concurrent=bool(body.get("concurrent", False)),
                signature=str(body.get("signature", "valid")),
                timestamp_offset_s=int(body.get("timestamp_offset_s", 0)),
            )
            return 200, {"statuses": statuses}
        raise StripeError(404, f"Unrecognized control URL ({method}: {path}).")


@dataclass
class RunningStripe:
    app: FakeStripe
    url: str


@asynccontextmanager
async def run_fake_stripe(
    api_key: str, webhook_secret: str, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[RunningStripe]:
    """Serve a fake Stripe in the running event loop (the process entry point uses this too)."""
    app = FakeStripe(api_key, webhook_secret)
    async with run_server(app, host=host, port=port) as server:
        app.base_url = server.url
        yield RunningStripe(app, server.url)


async def _serve_until_signalled(api_key: str, secret: str, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with run_fake_stripe(api_key, secret, host=host, port=port) as running:
        print(f"FAKE_STRIPE_READY {running.url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m quota_proxy.testing_stripe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", required=True, help="the secret key the gateway must present")
    parser.add_argument("--webhook-secret", required=True, help="the endpoint secret events are signed with")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_serve_until_signalled(args.api_key, args.webhook_secret, args.host, args.port))


if __name__ == "__main__":
    main()
