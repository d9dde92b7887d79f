"""Charts drawn on the server as SVG: no script, no library, readable without colour
(every bar has a <title>, and each chart sits next to a table with the same numbers)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

from quota_proxy.store.dashboard_models import DayRouteCharge

WIDTH, HEIGHT = 480, 240  # viewBox units; ticks stay readable from 320 px wide
LEFT, BOTTOM, TOP = 78, 28, 14
SERIES = 8  # colour classes s0..s7 in the stylesheet; further routes reuse them


@dataclass(frozen=True, slots=True)
class Legend:
    name: str
    css: str


def last_days(days: int, today: dt.date | None = None) -> list[str]:
    today = today or dt.datetime.now(dt.UTC).date()
    return [(today - dt.timedelta(days=i)).isoformat() for i in range(days - 1, -1, -1)]


def daily_route_chart(
    rows: Sequence[DayRouteCharge], days: int, label: Callable[[int], str], title: str
) -> tuple[Markup, list[Legend]]:
    """Stacked bars: one per day, one segment per route, heights in quota tokens."""
    day_list = last_days(days)
    routes = sorted({r.route for r in rows})
    css = {route: f"s{i % SERIES}" for i, route in enumerate(routes)}
    stacks: dict[str, list[DayRouteCharge]] = {d: [] for d in day_list}
    for row in rows:
        if row.day in stacks and row.charged > 0:
            stacks[row.day].append(row)
    top = max(max((sum(r.charged for r in stack) for stack in stacks.values()), default=0), 1)
    plot_w, plot_h = WIDTH - LEFT - 8, HEIGHT - BOTTOM - TOP
    slot = plot_w / len(day_list)
    bar = max(slot * 0.7, 1.0)
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-labelledby="chart-title" '
        'xmlns="http://www.w3.org/2000/svg">',
        f'<title id="chart-title">{escape(title)}</title>',
        f'<line class="axis" x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - 8}" y2="{TOP + plot_h}"/>',
        f'<line class="grid" x1="{LEFT}" y1="{TOP}" x2="{WIDTH - 8}" y2="{TOP}"/>',
        f'<text class="tick" x="{LEFT - 6}" y="{TOP + 4}" text-anchor="end">{escape(label(top))}</text>',
        f'<text class="tick" x="{LEFT - 6}" y="{TOP + plot_h}" text-anchor="end">{escape(label(0))}</text>',
    ]
    for i, day in enumerate(day_list):
        x = LEFT + i * slot + (slot - bar) / 2
        y: float = TOP + plot_h
        for row in sorted(stacks[day], key=lambda r: r.route):
            h = plot_h * row.charged / top
            y -= h
            parts.append(
                f'<rect class="{css[row.route]}" x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" '
                f'height="{max(h, 0.5):.1f}"><title>{escape(day)} {escape(row.route)}: '
                f"{escape(label(row.charged))}</title></rect>"
            )
        if i % 7 == 0 or (i == len(day_list) - 1 and i % 7 >= 4):
            parts.append(
                f'<text class="tick" x="{LEFT + i * slot + slot / 2:.1f}" y="{HEIGHT - 8}" '
                f'text-anchor="middle">{escape(day[5:])}</text>'
            )
    parts.append("</svg>")
    return Markup("".join(parts)), [Legend(route, css[route]) for route in routes]
