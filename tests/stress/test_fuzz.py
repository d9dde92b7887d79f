"""Scenario 6a — hostile input, fuzzed (SPEC §3: every error is JSON, no 500, no stack trace).

Property-based fuzzing (hypothesis) of bodies, headers, query strings, path parameters and
methods on every endpoint of a running `quota-proxy serve`: never a 500, never a traceback
or an HTML page, always the SPEC error shape for a 4xx, an `x-quota-request-id` on every
answer the app gives, and never a ledger, balance, hold, user or idempotency change from a
refused (or read-only) request: the SQLite file is compared before and after every example.
"""

from __future__ import annotations

import json
import string
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.stress.harness import RESULTS, Checks, GatewayProcess, ProcessSet, ledger_verify, scale
from tests.stress.test_hostile_input import ALIASES, money, start

hypothesis = pytest.importorskip("hypothesis", reason="the fuzzing scenario needs `pip install hypothesis`")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase  # noqa: E402

set_hypothesis_home_dir(str(RESULTS / ".hypothesis"))  # its caches too stay in the git-ignored results/

EXAMPLES = scale(150, 1000)  # per property
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=DirectoryBasedExampleDatabase(str(RESULTS / ".hypothesis")),
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)


# -- strategies ----------------------------------------------------------------------

json_leaf = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
             | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30))
json_any = st.recursive(json_leaf, lambda c: st.lists(c, max_size=4)
                        | st.dictionaries(st.text(max_size=12), c, max_size=4), max_leaves=12)
count_like = st.integers(min_value=-5, max_value=2**64) | json_leaf
messages = st.one_of(
    st.just([{"role": "user", "content": "fuzz me"}]),
    st.lists(st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "system", "tool", "x"]) | json_leaf,
                                                 "content": st.text(max_size=40) | json_any,
                                                 "name": json_leaf}), max_size=3),
    json_any,
)
inference_fields = {
    "model": st.sampled_from(ALIASES) | json_leaf,
    "messages": messages,
    "prompt": st.text(max_size=40) | json_any,
    "input": st.text(max_size=40) | json_any,
    "stream": st.booleans() | json_leaf,
    "stream_options": st.just({"include_usage": True}) | json_any,
    "max_tokens": count_like,
    "max_completion_tokens": count_like,
    "n": count_like,
    "best_of": count_like,
    "temperature": json_leaf,
    "tools": json_any,
    "user": json_leaf,
}
# Half the bodies start from a valid request and change a few fields, so that the fuzzing
# also reaches the hold, the upstream and settlement; the rest are free-form.
valid_base = st.fixed_dictionaries({
    "model": st.sampled_from(ALIASES),
    "messages": st.just([{"role": "user", "content": "fuzz me"}]),
    "prompt": st.just("fuzz me"),
    "input": st.just("fuzz me"),
})
inference_body = st.one_of(
    st.tuples(valid_base, st.fixed_dictionaries({}, optional=inference_fields)).map(lambda t: {**t[0], **t[1]}),
    st.fixed_dictionaries({}, optional=inference_fields),
).filter(lambda b: "fake" not in b)
grant_body = st.fixed_dictionaries({}, optional={
    "external_user_id": st.sampled_from(["known-user", "new-user", "a" * 129, "", "x' OR 1=1--"]) | json_leaf,
    "amount": (st.sampled_from([0.5, 1, "1", 0, -1, 1e-7, 0.0000001, 10_001, 1e308, True])
               | st.floats(min_value=-1e6, max_value=1e6) | json_leaf),
    "description": st.text(max_size=40) | st.just("d" * 501) | json_leaf,
}) | json_any
header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
                      max_size=60).map(lambda t: t.strip(" \t"))
token_chars = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
header_name = st.text(alphabet=token_chars, min_size=1, max_size=20)
paths = st.sampled_from([
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/balance", "/v1/me",
    "/v1/packages", "/v1/funding/grant", "/healthz", "/readyz", "/metrics", "/v1/users/known-user/balance",
    "/v1/users/known-user", "/v1/users/known-user/chat/completions", "/", "/v1", "/v1/", "/v1/users/",
    "/v1/users//balance", "/docs", "/openapi.json", "/v1/chat/completions/", "/V1/MODELS",
])
methods = st.sampled_from(["GET", "POST", "PATCH", "PUT", "DELETE", "HEAD", "OPTIONS", "TRACE", "FOO"])
path_param = st.one_of(st.sampled_from(["known-user", "unknown-user", "..", "%2e%2e", "%2F", "a" * 129,
                                        "x'%20OR%201=1--", "%00", "%ff%fe", "known-user%00"]),
                       st.text(max_size=40).map(lambda t: quote(t, safe="")))
query_string = st.lists(st.tuples(st.sampled_from(["external_user_id", "limit", "days", "x"]) | st.text(max_size=8),
                                  st.text(max_size=40)), max_size=4).map(
    lambda pairs: "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs))
raw_body = st.one_of(st.binary(max_size=200), json_any.map(lambda v: json.dumps(v).encode()),
                     st.sampled_from([b"", b"{", b"[" * 5000, b'{"a":' * 3000, b"\xff\xfe\x00", b"NaN",
                                      b'{"model": "stress/x1", "messages": [{"role": "user", "content": "\\ud800"}]}']))


def auth_headers(kind: str, keys: dict[str, str]) -> dict[str, str]:
    return {
        "live": {"authorization": f"Bearer {keys['live']}"},
        "secret": {"authorization": f"Bearer {keys['secret']}"},
        "x-api-key": {"x-api-key": keys["secret"]},
        "none": {},
        "garbage": {"authorization": "Bearer qta_live_" + "A" * 32},
        "basic": {"authorization": "Basic Zm9vOmJhcg=="},
        "empty": {"authorization": "Bearer"},
        "long": {"authorization": "Bearer " + "sk-quota-" + "z" * 4000},
    }[kind]


auth_kind = st.sampled_from(["live", "secret", "live", "secret", "x-api-key", "none", "garbage", "basic", "empty",
                             "long"])


# -- the fuzzing -----------------------------------------------------------------------


class Oracle:
    """Sends one fuzzed request and checks what must hold for every answer."""

    def __init__(self, gateway: GatewayProcess) -> None:
        self.gateway = gateway
        self.db = gateway.workdir / "quota.db"
        self.client = httpx.Client(timeout=30)
        self.statuses: Counter[int] = Counter()
        self.endpoints: Counter[str] = Counter()
        self.tried = 0
        self.upstream_5xx = 0
        self.protocol_rejections = 0

    def url(self, raw_path: str) -> httpx.URL:
        return httpx.URL(scheme="http", host="127.0.0.1", port=self.gateway.port, raw_path=raw_path.encode("ascii"))

    def check(self, method: str, raw_path: str, headers: dict[str, str], content: bytes | None) -> httpx.Response:
        before = money(self.db)
        raw_headers = {k: v.encode("latin-1") for k, v in headers.items()}
        resp = self.client.request(method, self.url(raw_path), headers=raw_headers, content=content)
        after = money(self.db)
        self.tried += 1
        self.statuses[resp.status_code] += 1
        path = raw_path.split("?")[0]
        self.endpoints[f"{method} {path if not path.startswith('/v1/users/') else '/v1/users/…'}"] += 1
        text = resp.content.decode("utf-8", "replace")
        where = f"{method} {raw_path[:120]} -> {resp.status_code} {text[:300]!r}"
        if resp.status_code == 400 and "x-quota-request-id" not in resp.headers:
            # uvicorn refused a request it could not parse (e.g. method FOO) before the app saw it
            assert text == "Invalid HTTP request received.", where
            assert before == after, where
            self.protocol_rejections += 1
            return resp
        inference = path.endswith("completions") or path.endswith("embeddings")
        assert resp.status_code != 500, where
        if resp.status_code in (502, 504):
            assert inference, where  # only a request that reached an upstream may be 502/504
            self.upstream_5xx += 1
        else:
            assert resp.status_code < 500, where
        assert "x-quota-request-id" in resp.headers, where
        assert "Traceback" not in text and "<html" not in text.lower(), where
        if resp.status_code >= 400 and method != "HEAD":
            assert resp.headers.get("content-type", "").startswith("application/json"), where
            error = resp.json().get("error")
            assert isinstance(error, dict), where
            assert isinstance(error.get("message"), str) and isinstance(error.get("type"), str), where
            # an upstream's own 4xx is passed through (SPEC §3) and may carry code: null
            assert isinstance(error.get("code"), str) or (inference and "code" in error), where
        if resp.status_code >= 400 or method in ("GET", "HEAD"):
            assert before == after, f"books changed by a refused/read-only request: {where}"
        if method == "PATCH" and resp.status_code == 200:
            assert before[0] == after[0] and before[2:] == after[2:], where
        return resp


def test_fuzzed_requests(procs: ProcessSet, workdir: Path) -> None:
    checks = Checks("6a_hostile_input_fuzz")
    gateway, keys = start(procs, workdir)
    oracle = Oracle(gateway)
    failures: dict[str, str] = {}

    @FUZZ_SETTINGS
    @given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                                 "/v1/users/known-user/chat/completions", "/v1/users/unknown-user/chat/completions"]),
           body=inference_body, kind=auth_kind)
    def inference(path: str, body: dict[str, Any], kind: str) -> None:
        content = json.dumps(body, allow_nan=True).encode()
        oracle.check("POST", path, {**auth_headers(kind, keys), "content-type": "application/json"}, content)

    @FUZZ_SETTINGS
    @given(body=grant_body, kind=auth_kind, idem=st.none() | header_text | st.text(alphabet=token_chars, max_size=300))
    def grants(body: Any, kind: str, idem: str | None) -> None:
        headers = auth_headers(kind, keys)
        if idem is not None:
            headers["idempotency-key"] = idem
        oracle.check("POST", "/v1/funding/grant", headers, json.dumps(body, allow_nan=True).encode())

    @FUZZ_SETTINGS
    @given(user=path_param, rest=st.sampled_from(["/balance", "", "/chat/completions", "/x", "/balance/extra"]),
           method=methods, kind=auth_kind, qs=query_string,
           body=st.none() | st.fixed_dictionaries({}, optional={"billing_mode": st.sampled_from(["user", "developer"])
                                                               | json_leaf, "extra": json_leaf}))
    def users(user: str, rest: str, method: str, kind: str, qs: str, body: Any) -> None:
        raw = f"/v1/users/{user}{rest}" + (f"?{qs}" if qs else "")
        content = None if body is None else json.dumps(body, allow_nan=True).encode()
        oracle.check(method, raw, auth_headers(kind, keys), content)

    @FUZZ_SETTINGS
    @given(path=paths, method=methods, kind=auth_kind, qs=query_string, body=st.none() | raw_body,
           extra=st.dictionaries(header_name, header_text, max_size=4))
    def anything(path: str, method: str, kind: str, qs: str, body: bytes | None, extra: dict[str, str]) -> None:
        headers = {k: v for k, v in extra.items() if k.lower() not in ("content-length", "transfer-encoding", "host",
                                                                       "connection", "expect", "upgrade")}
        headers.update(auth_headers(kind, keys))
        oracle.check(method, path + (f"?{qs}" if qs else ""), headers, body)

    started = time.monotonic()
    for prop in (inference, grants, users, anything):
        try:
            prop()
        except Exception as exc:  # hypothesis has shrunk it: report, then fail below
            failures[prop.__name__] = f"{type(exc).__name__}: {str(exc)[:1500]}"
        checks.expect(f"{prop.__name__}: every fuzzed answer meets the SPEC", prop.__name__ not in failures,
                      failures.get(prop.__name__))
    oracle.client.close()
    code, verify = ledger_verify(gateway)
    checks.expect("quota-proxy ledger verify exits 0", code == 0, verify)
    checks.expect("the gateway is still up", gateway.running())
    checks.finish({
        "properties": ["inference bodies", "grant bodies + Idempotency-Key", "user path params + methods + query",
                       "any endpoint: methods, headers, query, raw bodies"],
        "max_examples_per_property": EXAMPLES,
        "requests_tried": oracle.tried,
        "statuses": dict(sorted(oracle.statuses.items())),
        "distinct_endpoints": len(oracle.endpoints),
        "upstream_5xx_passed_on": oracle.upstream_5xx,
        "rejected_by_uvicorn_before_the_app": oracle.protocol_rejections,
        "elapsed_s": round(time.monotonic() - started, 1),
        "schemathesis": "not run: the gateway serves no OpenAPI document yet (see docs/reliability.md)",
    })
