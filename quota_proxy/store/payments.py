"""Money coming in: orders, provider events, redemption codes — over the SQLite store.

Every credit is one ledger entry written in the same transaction as the state change that
justifies it (an event recorded under UNIQUE (provider, event_id) and an order moved by a
conditional UPDATE; a code claimed by a conditional UPDATE). Those transactions commit with
`synchronous = FULL`, so a payment acknowledged to the provider survives a power cut.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from quota_proxy.keys import new_id, new_ledger_id
from quota_proxy.store.records import now_ms
from quota_proxy.store.sql import SqlConnection
from quota_proxy.store.sqlite import SqliteStore

_ORDER_COLUMNS = (
    "o.id, o.public_id, o.account_id, a.name, o.package_id, o.amount_cents, o.currency, "
    "o.quota_tokens, o.provider, o.provider_ref, o.payment_ref, o.status, o.checkout_url, "
    "o.paid_event_id, o.ledger_id, o.refunded_cents, o.refunded_tokens, o.refund_ledger_ids, "
    "o.created_at, o.updated_at"
)
_ORDER_FROM = "FROM orders o JOIN accounts a ON a.id = o.account_id"
_LEDGER_INSERT = (
    "INSERT INTO ledger (public_id, account_id, amount, balance_after, kind, idempotency_key, "
    "related_id, description, created_at) SELECT ?, id, ?, balance + ?, ?, ?, ?, ?, ? "
    "FROM accounts WHERE id = ? RETURNING balance_after"
)


class OrderStatus(StrEnum):
    PENDING = "pending"
    PAID = "paid"
    EXPIRED = "expired"
    REFUNDED = "refunded"


@dataclass(frozen=True, slots=True)
class Order:
    id: int
    public_id: str
    account_id: int
    account_name: str
    package_id: str
    amount_cents: int
    currency: str
    quota_tokens: int
    provider: str
    provider_ref: str | None
    payment_ref: str | None
    status: str
    checkout_url: str | None
    paid_event_id: str | None
    ledger_id: str | None
    refunded_cents: int
    refunded_tokens: int
    refund_ledger_ids: tuple[str, ...]
    created_at: int
    updated_at: int


def _order(row: Any) -> Order:
    values = list(row)
    values[17] = tuple(orjson.loads(values[17]))
    return Order(*values)


class EventOutcome(StrEnum):
    """What processing one provider event did; `duplicate` means an earlier delivery did it."""

    CREDITED = "credited"
    EXPIRED = "expired"
    REFUNDED = "refunded"
    DUPLICATE = "duplicate"
    MISMATCH = "mismatch"
    IGNORED = "ignored"


@dataclass(frozen=True, slots=True)
class EventResult:
    outcome: EventOutcome
    order_id: str | None = None
    ledger_id: str | None = None
    detail: str = ""


class RetryLater(Exception):
    """The event refers to something not recorded yet; the provider should deliver it again."""


@dataclass(frozen=True, slots=True)
class Redemption:
    code_id: str
    package_id: str
    quota_tokens: int
    ledger_id: str
    balance_after: int


class CodeRefused(Exception):
    """unknown, used or expired: the caller learns only that the code is invalid."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


# Checks an order against the event about it; returns why they disagree, or None.
OrderCheck = Callable[[Order], str | None]


class PaymentStore:
    """Orders, provider events and redemption codes, on the store's transaction connection."""

    # The ledger entry for a credit or a refund, balance_after returned; parameters: public id,
    # amount, amount again, kind, idempotency key, related id, description, time, account id.
    ledger_insert = _LEDGER_INSERT
    # Appended to the order read in an event's transaction: SQLite's transaction is exclusive
    # already; PostgreSQL locks the row (FOR UPDATE) so concurrent events on it queue.
    order_lock = ""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store

    @property
    def _db(self) -> SqlConnection:
        """Autocommit statements outside a transaction."""
        return self.store.db

    def _transaction(self) -> AbstractAsyncContextManager[SqlConnection]:
        return self.store._durable_tx()

    # -- orders -------------------------------------------------------------------

    async def create_order(
        self,
        account_id: int,
        package_id: str,
        amount_cents: int,
        currency: str,
        quota_tokens: int,
        provider: str,
    ) -> Order:
        now = now_ms()
        public_id = new_id("ord")
        await self._db.execute(
            "INSERT INTO orders (public_id, account_id, package_id, amount_cents, currency, "
            "quota_tokens, provider, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (public_id, account_id, package_id, amount_cents, currency, quota_tokens, provider,
             now, now),
        )
        order = await self.order(public_id)
        assert order is not None
        return order

    async def attach_checkout(self, order_id: str, provider_ref: str, checkout_url: str) -> None:
        await self._db.execute(
            "UPDATE orders SET provider_ref = ?, checkout_url = ?, updated_at = ? "
            "WHERE public_id = ? AND provider_ref IS NULL",
            (provider_ref, checkout_url, now_ms(), order_id),
        )

    async def abandon_order(self, order_id: str) -> None:
        """The provider refused to open a checkout: the order can never be paid."""
        await self._db.execute(
            "UPDATE orders SET status = 'expired', updated_at = ? "
            "WHERE public_id = ? AND status = 'pending'",
            (now_ms(), order_id),
        )

    async def order(self, public_id: str) -> Order | None:
        rows = await self._db.execute_fetchall(
            f"SELECT {_ORDER_COLUMNS} {_ORDER_FROM} WHERE o.public_id = ?", (public_id,)
        )
        row = next(iter(rows), None)
        return _order(row) if row else None

    async def orders(self, account_id: int, limit: int = 100) -> list[Order]:
        rows = await self._db.execute_fetchall(
            f"SELECT {_ORDER_COLUMNS} {_ORDER_FROM} WHERE o.account_id = ? ORDER BY o.id DESC LIMIT ?",
            (account_id, limit),
        )
        return [_order(r) for r in rows]

    # -- provider events ----------------------------------------------------------

    async def _claim_event(
        self, tx: SqlConnection, provider: str, event_id: str, event_type: str
    ) -> bool:
        """Record the event; False when it was recorded before (a replay or a resend)."""
        rows = await tx.execute_fetchall(
            "INSERT INTO payment_events (provider, event_id, type, outcome, created_at) "
            "VALUES (?, ?, ?, 'processing', ?) ON CONFLICT (provider, event_id) DO NOTHING "
            "RETURNING id",
            (provider, event_id, event_type, now_ms()),
        )
        return bool(list(rows))

    async def _finish_event(
        self, tx: SqlConnection, provider: str, event_id: str, result: EventResult
    ) -> EventResult:
        outcome = result.outcome.value + (f": {result.detail}" if result.detail else "")
        await tx.execute(
            "UPDATE payment_events SET outcome = ?, order_id = ?, ledger_id = ? "
            "WHERE provider = ? AND event_id = ?",
            (outcome, result.order_id, result.ledger_id, provider, event_id),
        )
        return result

    async def _order_in_tx(self, tx: SqlConnection, where: str, params: tuple[Any, ...]) -> Order | None:
        rows = await tx.execute_fetchall(
            f"SELECT {_ORDER_COLUMNS} {_ORDER_FROM} WHERE {where}{self.order_lock}", params
        )
        row = next(iter(rows), None)
        return _order(row) if row else None

    async def record_ignored(self, provider: str, event_id: str, event_type: str, why: str) -> EventResult:
        async with self._transaction() as tx:
            if not await self._claim_event(tx, provider, event_id, event_type):
                return EventResult(EventOutcome.DUPLICATE)
            return await self._finish_event(
                tx, provider, event_id, EventResult(EventOutcome.IGNORED, detail=why)
            )

    async def apply_paid(
        self,
        provider: str,
        event_id: str,
        event_type: str,
        order_ref: str | None,
        session_ref: str,
        payment_ref: str | None,
        check: OrderCheck,
    ) -> EventResult:
        """Credit a paid order once: record the event, pending -> paid, one purchase entry,
        after `check` (the event against the order) found nothing wrong."""
        async with self._transaction() as tx:
            if not await self._claim_event(tx, provider, event_id, event_type):
                return EventResult(EventOutcome.DUPLICATE)
            if order_ref is not None:
                order = await self._order_in_tx(tx, "o.public_id = ?", (order_ref,))
            else:  # no reference in the event: the session it was opened with names it
                order = await self._order_in_tx(
                    tx, "o.provider = ? AND o.provider_ref = ?", (provider, session_ref)
                )
            if order is None:
                return await self._finish_event(
                    tx, provider, event_id,
                    EventResult(EventOutcome.MISMATCH, detail=f"no order {order_ref!r}"),
                )
            if order.provider == provider and order.provider_ref is None and order.status == "pending":
                # The provider opened this checkout but our record of it is missing: the event
                # outran attach_checkout, or the process died between the two. The event is
                # signed and names this order, so it adopts the event's session — only if every
                # check passes with it, so a bad event cannot bind the order to a wrong session.
                adopted = dataclasses.replace(order, provider_ref=session_ref)
                problem = check(adopted)
                if problem is None:
                    await tx.execute(
                        "UPDATE orders SET provider_ref = ? WHERE id = ? AND provider_ref IS NULL",
                        (session_ref, order.id),
                    )
                    order = adopted
            else:
                problem = check(order)
            if problem is not None:
                return await self._finish_event(
                    tx, provider, event_id,
                    EventResult(EventOutcome.MISMATCH, order.public_id, detail=problem),
                )
            now = now_ms()
            ledger_id = new_ledger_id()
            moved = list(
                await tx.execute_fetchall(
                    "UPDATE orders SET status = 'paid', ledger_id = ?, paid_event_id = ?, "
                    "payment_ref = coalesce(?, payment_ref), updated_at = ? "
                    "WHERE id = ? AND status = 'pending' RETURNING id",
                    (ledger_id, event_id, payment_ref, now, order.id),
                )
            )
            if not moved:
                return await self._finish_event(
                    tx, provider, event_id,
                    EventResult(EventOutcome.IGNORED, order.public_id, detail=f"order is {order.status}"),
                )
            description = (
                f"order {order.public_id} (package {order.package_id}), {provider} event {event_id}"
            )
            await tx.execute_fetchall(
                self.ledger_insert,
                (ledger_id, order.quota_tokens, order.quota_tokens, "purchase", event_id,
                 order.public_id, description, now, order.account_id),
            )
            return await self._finish_event(
                tx, provider, event_id,
                EventResult(EventOutcome.CREDITED, order.public_id, ledger_id),
            )

    async def apply_expired(
        self, provider: str, event_id: str, event_type: str, order_ref: str | None, provider_ref: str
    ) -> EventResult:
        async with self._transaction() as tx:
            if not await self._claim_event(tx, provider, event_id, event_type):
                return EventResult(EventOutcome.DUPLICATE)
            order = await self._order_in_tx(
                tx, "coalesce(?, o.public_id) = o.public_id AND o.provider = ? AND o.provider_ref = ?",
                (order_ref, provider, provider_ref),
            )
            if order is None:
                return await self._finish_event(
                    tx, provider, event_id,
                    EventResult(EventOutcome.MISMATCH, detail=f"no {provider} order {order_ref!r} "
                                f"with session {provider_ref!r}"),
                )
            moved = list(
                await tx.execute_fetchall(
                    "UPDATE orders SET status = 'expired', updated_at = ? "
                    "WHERE id = ? AND status = 'pending' RETURNING id",
                    (now_ms(), order.id),
                )
            )
            outcome = EventOutcome.EXPIRED if moved else EventOutcome.IGNORED
            detail = "" if moved else f"order is {order.status}"
            return await self._finish_event(
                tx, provider, event_id, EventResult(outcome, order.public_id, detail=detail)
            )

    async def apply_refund(
        self,
        provider: str,
        event_id: str,
        event_type: str,
        payment_ref: str,
        order_ref: str | None,
        refunded_cents: int,
        currency: str,
    ) -> EventResult:
        """Take back the tokens of what has been refunded so far (cumulative, like Stripe's
        `amount_refunded`), so a reordered or repeated partial refund never takes twice.

        Tokens back = floor(quota_tokens × refunded / amount), the rest of a full refund
        exactly. The account's balance may go below zero: see docs/payments.md.
        """
        async with self._transaction() as tx:
            if not await self._claim_event(tx, provider, event_id, event_type):
                return EventResult(EventOutcome.DUPLICATE)
            order = await self._order_in_tx(
                tx, "o.provider = ? AND o.payment_ref = ?", (provider, payment_ref)
            )
            if order is None and order_ref is not None:
                # The charge names its order (the PaymentIntent's metadata): a payment not
                # recorded yet is retried later; a paid order without a recorded payment is it.
                named = await self._order_in_tx(
                    tx, "o.public_id = ? AND o.provider = ?", (order_ref, provider)
                )
                if named is not None and named.status == "pending":
                    raise RetryLater(f"order {order_ref} is refunded before its payment was recorded")
                if named is not None and named.payment_ref is None:
                    order = named
            if order is None:
                return await self._finish_event(
                    tx, provider, event_id,
                    EventResult(EventOutcome.MISMATCH, detail=f"no paid order for payment {payment_ref!r}"),
                )
            if currency != order.currency or refunded_cents > order.amount_cents:
                return await self._finish_event(
                    tx, provider, event_id,
                    EventResult(EventOutcome.MISMATCH, order.public_id,
                                detail=f"refund {refunded_cents} {currency} does not fit the order"),
                )
            if refunded_cents <= order.refunded_cents or order.status not in ("paid", "refunded"):
                return await self._finish_event(
                    tx, provider, event_id,
                    EventResult(EventOutcome.IGNORED, order.public_id, detail="nothing new refunded"),
                )
            full = refunded_cents == order.amount_cents
            tokens_total = (
                order.quota_tokens if full else order.quota_tokens * refunded_cents // order.amount_cents
            )
            take = tokens_total - order.refunded_tokens
            now = now_ms()
            ledger_id = new_ledger_id() if take > 0 else None
            ledger_ids = [*order.refund_ledger_ids, *([ledger_id] if ledger_id else [])]
            moved = list(
                await tx.execute_fetchall(
                    "UPDATE orders SET refunded_cents = ?, refunded_tokens = ?, refund_ledger_ids = ?, "
                    "status = CASE WHEN ? THEN 'refunded' ELSE status END, updated_at = ? "
                    "WHERE id = ? AND refunded_cents = ? RETURNING id",
                    (refunded_cents, tokens_total, orjson.dumps(ledger_ids).decode(), full, now,
                     order.id, order.refunded_cents),
                )
            )
            assert moved, "the order changed under the transaction lock"
            if ledger_id is not None:
                description = (
                    f"refund of order {order.public_id} ({refunded_cents}/{order.amount_cents} "
                    f"{order.currency} cents refunded), {provider} event {event_id}"
                )
                await tx.execute_fetchall(
                    self.ledger_insert,
                    (ledger_id, -take, -take, "refund", event_id, order.public_id, description, now,
                     order.account_id),
                )
            return await self._finish_event(
                tx, provider, event_id, EventResult(EventOutcome.REFUNDED, order.public_id, ledger_id)
            )

    async def event_outcomes(self, provider: str) -> list[tuple[str, str, str | None]]:
        rows = await self._db.execute_fetchall(
            "SELECT event_id, outcome, order_id FROM payment_events WHERE provider = ? ORDER BY id",
            (provider,),
        )
        return [(r[0], r[1], r[2]) for r in rows]

    # -- redemption codes ---------------------------------------------------------

    async def create_codes(
        self, digests: list[str], package_id: str, quota_tokens: int, expires_at: int | None
    ) -> list[str]:
        """Store the codes' digests; returns their public ids (code_…), in order."""
        now = now_ms()
        ids = [new_id("code") for _ in digests]
        async with self._transaction() as tx:
            await tx.executemany(
                "INSERT INTO redemption_codes (public_id, digest, package_id, quota_tokens, "
                "expires_at, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                [(i, d, package_id, quota_tokens, expires_at, now) for i, d in zip(ids, digests, strict=True)],
            )
        return ids

    async def redeem(self, account_id: int, digest: str) -> Redemption:
        """Claim the code for the account and credit it: one conditional UPDATE decides.

        CodeRefused("unknown" | "used" | "expired") otherwise; nothing is written then.
        """
        now = now_ms()
        ledger_id = new_ledger_id()
        async with self._transaction() as tx:
            claimed = list(
                await tx.execute_fetchall(
                    "UPDATE redemption_codes SET claimed_by = ?, claimed_at = ?, ledger_id = ? "
                    "WHERE digest = ? AND claimed_at IS NULL AND (expires_at IS NULL OR expires_at > ?) "
                    "RETURNING public_id, package_id, quota_tokens",
                    (account_id, now, ledger_id, digest, now),
                )
            )
            if not claimed:
                rows = list(
                    await tx.execute_fetchall(
                        "SELECT claimed_at FROM redemption_codes WHERE digest = ?", (digest,)
                    )
                )
                raise CodeRefused("unknown" if not rows else "used" if rows[0][0] else "expired")
            code_id, package_id, tokens = claimed[0]
            after = list(
                await tx.execute_fetchall(
                    self.ledger_insert,
                    (ledger_id, tokens, tokens, "purchase", None, code_id,
                     f"redemption code {code_id} (package {package_id})", now, account_id),
                )
            )[0][0]
        return Redemption(code_id, package_id, tokens, ledger_id, int(after))

    async def codes(self, limit: int = 1000) -> list[dict[str, Any]]:
        rows = await self._db.execute_fetchall(
            "SELECT c.public_id, c.package_id, c.quota_tokens, c.expires_at, a.name, c.claimed_at, "
            "c.ledger_id, c.created_at FROM redemption_codes c "
            "LEFT JOIN accounts a ON a.id = c.claimed_by ORDER BY c.id DESC LIMIT ?",
            (limit,),
        )
        keys = ("id", "package", "quota_tokens", "expires_at", "claimed_by", "claimed_at",
                "ledger_id", "created_at")
        return [dict(zip(keys, r, strict=True)) for r in rows]

