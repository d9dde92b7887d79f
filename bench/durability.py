"""What durable credits cost: N credits and N settlements, each at synchronous NORMAL and FULL.

    python bench/durability.py              # 500 of each, store in a temporary directory
    python bench/durability.py -n 2000 --dir /var/lib/quota-proxy   # on the disk you deploy to

The store commits credits, purchases, grants, accounts and keys with `synchronous = FULL`
(on disk before the call returns) and charges with `synchronous = NORMAL` (a power cut may
roll back the last few). This times both kinds of write under both settings in one run,
through the store API, so the price of each choice is measured rather than guessed:
  credit  FULL    what the store does
  credit  NORMAL  what it did before (and what a lost power costs in exchange)
  settle  NORMAL  what the store does (take_hold + settle, the request path's writes)
  settle  FULL    what making charges durable as well would cost
The rows run interleaved in rounds, so a disk that slows down mid-run hurts all four alike.
Results are printed and written as JSON to bench/results/durability-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quota_proxy.keys import new_id  # noqa: E402
from quota_proxy.store import Outcome, Settlement  # noqa: E402
from quota_proxy.store.sqlite import SqliteStore  # noqa: E402

ROUNDS = 5


def stats(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    return {
        "n": len(s),
        "mean_ms": statistics.fmean(s),
        "p50_ms": statistics.median(s),
        "p99_ms": s[int(0.99 * (len(s) - 1))],
        "per_second": len(s) / (sum(s) / 1000),
    }


async def set_sync(store: SqliteStore, mode: str) -> None:
    """Both of the store's connections at one setting (the bench's only reach inside)."""
    assert store._tx is not None
    await store.db.execute(f"PRAGMA synchronous = {mode}")
    await store._tx.execute(f"PRAGMA synchronous = {mode}")


async def run(n: int, directory: Path) -> dict[str, Any]:
    times: dict[tuple[str, str], list[float]] = {
        (op, mode): [] for op in ("credit", "settle") for mode in ("NORMAL", "FULL")
    }
    async with SqliteStore(directory / "durability.db") as store:
        account = await store.create_account("bench")
        await store.credit(account.id, 10**15, "credit", "float")
        per_round = max(1, n // ROUNDS)
        for _ in range(ROUNDS):
            for mode in ("NORMAL", "FULL"):
                await set_sync(store, mode)
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    await store.credit(account.id, 1, "credit", "bench")
                    times[("credit", mode)].append((time.perf_counter() - t0) * 1000)
                for _ in range(per_round):
                    rid = new_id("req")
                    t0 = time.perf_counter()
                    hold = await store.take_hold(account.id, 100, rid, "bench", 60_000)
                    await store.settle(
                        Settlement(rid, account.id, account.id, None, None, hold, "quota/fast", "m",
                                   40, 20, "x1", 60, False, Outcome.OK, 200, cache_read_tokens=5)
                    )
                    times[("settle", mode)].append((time.perf_counter() - t0) * 1000)
        problems = await store.verify_ledger()
    if problems:
        raise SystemExit(f"ledger verify failed: {problems}")
    rows = {f"{op} {mode}": stats(ms) for (op, mode), ms in times.items()}
    return {
        "n_per_row": ROUNDS * max(1, n // ROUNDS),
        "directory": str(directory),
        "rows": rows,
        "credit_full_over_normal": rows["credit FULL"]["mean_ms"] / rows["credit NORMAL"]["mean_ms"],
        "settle_full_over_normal": rows["settle FULL"]["mean_ms"] / rows["settle NORMAL"]["mean_ms"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=500, help="writes per row (default 500)")
    parser.add_argument("--dir", type=Path, help="where the store file goes (default: a temporary directory)")
    parser.add_argument("--out", type=Path, help="JSON output file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        result = asyncio.run(run(args.n, Path(tmp)))
    result["python"] = sys.version.split()[0]
    print(f"{'write':<15} {'n':>6} {'mean ms':>9} {'p50 ms':>9} {'p99 ms':>9} {'per s':>9}")
    for name, r in result["rows"].items():
        print(f"{name:<15} {r['n']:>6} {r['mean_ms']:>9.3f} {r['p50_ms']:>9.3f} {r['p99_ms']:>9.3f} "
              f"{r['per_second']:>9.0f}")
    print(f"credit: FULL / NORMAL = {result['credit_full_over_normal']:.2f}x")
    print(f"settle: FULL / NORMAL = {result['settle_full_over_normal']:.2f}x")
    out = args.out or Path(__file__).resolve().parent / "results" / (
        f"durability-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
