"""GET /v1/usage: the account's usage summed per day, route, key, app user or agent session,
as JSON or CSV. input_tokens are uncached input; cache reads and writes are their own columns.

The dashboard's Usage page and its CSV download use the same functions, so the two always
show the same numbers.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from quota_proxy.api.common import Services, query
from quota_proxy.asgi import Receive, Scope, Send, send_bytes, send_json
from quota_proxy.errors import BadRequest
from quota_proxy.money import Money
from quota_proxy.state import caller_key
from quota_proxy.store.dashboard_models import UsageGroup, UsageLine

MAX_DAYS = 366
CSV_COLUMNS = (
    "requests", "input_tokens", "cache_read_tokens", "cache_write_tokens", "output_tokens",
    "charged_quota_tokens", "charged_usd",
)


def parse_group(value: str) -> UsageGroup:
    try:
        return UsageGroup(value)
    except ValueError:
        raise BadRequest(
            "'group_by' must be one of: " + ", ".join(g.value for g in UsageGroup), param="group_by"
        ) from None


def parse_days(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= MAX_DAYS:
        raise BadRequest(f"'days' must be a whole number from 1 to {MAX_DAYS}.", param="days")
    return int(value)


def usage_csv(group: UsageGroup, lines: list[UsageLine], money: Money) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow((group.value, *CSV_COLUMNS))
    for line in lines:
        writer.writerow(
            (line.label, line.requests, line.input_tokens, line.cache_read_tokens,
             line.cache_write_tokens, line.output_tokens, line.charged,
             money.usd(line.charged).replace("$", ""))
        )
    return out.getvalue()


def usage_json(group: UsageGroup, days: int, lines: list[UsageLine], money: Money) -> dict[str, Any]:
    return {
        "object": "list",
        "group_by": group.value,
        "days": days,
        "data": [
            {
                group.value: line.label,
                "requests": line.requests,
                "input_tokens": line.input_tokens,
                "cache_read_tokens": line.cache_read_tokens,
                "cache_write_tokens": line.cache_write_tokens,
                "output_tokens": line.output_tokens,
                "charged_quota_tokens": line.charged,
                "charged": money.usd(line.charged),
            }
            for line in lines
        ],
    }


class UsageApi:
    def __init__(self, services: Services) -> None:
        self.s = services

    async def usage(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = caller_key(scope)
        params = query(scope)
        group = parse_group(params.get("group_by", "day"))
        days = parse_days(params.get("days", "30"))
        fmt = params.get("format", "json")
        if fmt not in ("json", "csv"):
            raise BadRequest("'format' must be json or csv.", param="format")
        lines = await self.s.store.usage_by(key.account_id, group, days)
        if fmt == "csv":
            await send_bytes(
                send, 200, usage_csv(group, lines, self.s.money).encode(),
                [(b"content-disposition", f'attachment; filename="usage-by-{group.value}.csv"'.encode())],
                content_type=b"text/csv; charset=utf-8",
            )
            return
        await send_json(send, 200, usage_json(group, days, lines, self.s.money))
