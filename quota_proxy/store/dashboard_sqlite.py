"""The dashboard's queries on SQLite: sign-in (logins, invitations, sessions, throttling) and
the reports its pages show. Mixed into SqliteStore; plain SQL so another engine can mirror it.

Every query that a developer's page runs takes the account id from the session, never
from the request, so a guessed id from another account matches nothing.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiosqlite

from quota_proxy.keys import new_id
from quota_proxy.store.dashboard_models import (
    DashboardSession,
    DayRouteCharge,
    Invitation,
    Login,
    OpenHold,
    Role,
    ThrottleScope,
    UpstreamErrors,
    UsageGroup,
    UsageLine,
)
from quota_proxy.store.models import Account
from quota_proxy.store.records import REQUEST_USAGE_LINE_SUMS, USAGE_LINE_SUMS

_LOGIN_COLUMNS = (
    "l.id, l.public_id, l.email, l.account_id, a.name, l.role, l.password_hash, l.created_at, "
    "l.disabled_at"
)
_INVITATION_COLUMNS = (
    "i.id, i.public_id, i.email, i.account_id, a.name, i.role, i.created_at, i.expires_at, i.used_at"
)
_SESSION_COLUMNS = (
    "s.id, s.public_id, s.login_id, l.email, l.role, l.account_id, a.name, s.created_at, "
    "s.last_seen_at, s.idle_timeout_ms, s.expires_at, s.revoked_at, s.address"
)
_SESSION_FROM = (
    "FROM dashboard_sessions s JOIN dashboard_logins l ON l.id = s.login_id "
    "JOIN accounts a ON a.id = l.account_id"
)
TOUCH_EVERY_MS = 30_000  # last_seen is written at most this often per session


def _now_ms() -> int:
    return int(time.time() * 1000)


def _since_day(days: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() - (days - 1) * 86400))


def _login(row: Any) -> Login:
    values = list(row)
    values[5] = Role(values[5])
    return Login(*values)


def _invitation(row: Any) -> Invitation:
    values = list(row)
    values[5] = Role(values[5])
    return Invitation(*values)


def _session(row: Any) -> DashboardSession:
    values = list(row)
    values[4] = Role(values[4])
    return DashboardSession(*values)


class DashboardQueries:
    """Methods SqliteStore gains for the dashboard; they use its connections and lock."""

    def _durable_tx(self) -> AbstractAsyncContextManager[aiosqlite.Connection]:
        raise NotImplementedError

    async def _durable(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        """One statement on disk when it returns: revocations must survive a power cut."""
        async with self._durable_tx() as tx:
            return list(await tx.execute_fetchall(sql, tuple(params)))

    async def _one(self, sql: str, params: Iterable[Any] = ()) -> Any:
        raise NotImplementedError

    async def _all(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        raise NotImplementedError

    # -- invitations and logins ------------------------------------------------------

    async def create_invitation(
        self, account_id: int, email: str, role: Role, token_digest: str, expires_at: int
    ) -> Invitation:
        row = await self._one(
            "INSERT INTO dashboard_invitations (public_id, token_digest, email, account_id, role, "
            "created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (new_id("inv"), token_digest, email.lower(), account_id, role.value, _now_ms(), expires_at),
        )
        rows = await self._all(
            f"SELECT {_INVITATION_COLUMNS} FROM dashboard_invitations i "
            "JOIN accounts a ON a.id = i.account_id WHERE i.id = ?",
            (row[0],),
        )
        return _invitation(rows[0])

    async def list_invitations(self, limit: int = 50) -> list[Invitation]:
        rows = await self._all(
            f"SELECT {_INVITATION_COLUMNS} FROM dashboard_invitations i "
            "JOIN accounts a ON a.id = i.account_id ORDER BY i.id DESC LIMIT ?",
            (limit,),
        )
        return [_invitation(r) for r in rows]

    async def pending_invitation(self, token_digest: str) -> Invitation | None:
        """The invitation if it is unused and unexpired."""
        row = await self._one(
            f"SELECT {_INVITATION_COLUMNS} FROM dashboard_invitations i "
            "JOIN accounts a ON a.id = i.account_id "
            "WHERE i.token_digest = ? AND i.used_at IS NULL AND i.expires_at > ?",
            (token_digest, _now_ms()),
        )
        return _invitation(row) if row else None

    async def accept_invitation(self, token_digest: str, password_hash: str) -> Login | None:
        """Use the invitation once and set the login's password, in one transaction.

        The conditional UPDATE is what makes it single-use: of two concurrent submits only
        one finds `used_at IS NULL`. None if the invitation is unknown, used or expired.
        """
        now = _now_ms()
        async with self._durable_tx() as tx:
            used = list(
                await tx.execute_fetchall(
                    "UPDATE dashboard_invitations SET used_at = ? "
                    "WHERE token_digest = ? AND used_at IS NULL AND expires_at > ? "
                    "RETURNING email, account_id, role",
                    (now, token_digest, now),
                )
            )
            if not used:
                return None
            email, account_id, role = used[0]
            await tx.execute(
                "INSERT INTO dashboard_logins (public_id, email, account_id, role, password_hash, "
                "created_at, password_set_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (email) DO UPDATE SET account_id = excluded.account_id, "
                "role = excluded.role, password_hash = excluded.password_hash, "
                "password_set_at = excluded.password_set_at, disabled_at = NULL",
                (new_id("login"), email, account_id, role, password_hash, now, now),
            )
            # A new password ends every session opened with the old one.
            await tx.execute(
                "UPDATE dashboard_sessions SET revoked_at = ? WHERE revoked_at IS NULL AND "
                "login_id = (SELECT id FROM dashboard_logins WHERE email = ?)",
                (now, email),
            )
        return await self.login_by_email(email)

    async def login_by_email(self, email: str) -> Login | None:
        row = await self._one(
            f"SELECT {_LOGIN_COLUMNS} FROM dashboard_logins l JOIN accounts a ON a.id = l.account_id "
            "WHERE l.email = ?",
            (email.lower(),),
        )
        return _login(row) if row else None

    async def list_logins(self) -> list[Login]:
        rows = await self._all(
            f"SELECT {_LOGIN_COLUMNS} FROM dashboard_logins l JOIN accounts a ON a.id = l.account_id "
            "ORDER BY l.email"
        )
        return [_login(r) for r in rows]

    async def disable_login(self, email: str) -> bool:
        """Stop a login from signing in and end its sessions; a new invitation enables it again."""
        now = _now_ms()
        async with self._durable_tx() as tx:
            rows = list(
                await tx.execute_fetchall(
                    "UPDATE dashboard_logins SET disabled_at = coalesce(disabled_at, ?) WHERE email = ? "
                    "RETURNING id",
                    (now, email.lower()),
                )
            )
            if rows:
                await tx.execute(
                    "UPDATE dashboard_sessions SET revoked_at = ? WHERE login_id = ? AND revoked_at IS NULL",
                    (now, rows[0][0]),
                )
        return bool(rows)

    # -- sessions ------------------------------------------------------------------------

    async def create_session(
        self, login_id: int, token_digest: str, idle_timeout_ms: int, max_age_ms: int, address: str
    ) -> str:
        now = _now_ms()
        public_id = new_id("sess")
        await self._one(
            "INSERT INTO dashboard_sessions (public_id, token_digest, login_id, created_at, "
            "last_seen_at, idle_timeout_ms, expires_at, address) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "RETURNING id",
            (public_id, token_digest, login_id, now, now, idle_timeout_ms, now + max_age_ms, address),
        )
        return public_id

    async def live_session(self, token_digest: str) -> DashboardSession | None:
        """The session if it is neither revoked nor past its idle or absolute expiry, and its
        login is enabled; marks it seen (at most every TOUCH_EVERY_MS)."""
        now = _now_ms()
        row = await self._one(
            f"SELECT {_SESSION_COLUMNS} {_SESSION_FROM} WHERE s.token_digest = ? "
            "AND s.revoked_at IS NULL AND s.expires_at > ? AND s.last_seen_at + s.idle_timeout_ms > ? "
            "AND l.disabled_at IS NULL",
            (token_digest, now, now),
        )
        if row is None:
            return None
        session = _session(row)
        if now - session.last_seen_at >= TOUCH_EVERY_MS:
            await self._one(
                "UPDATE dashboard_sessions SET last_seen_at = ? WHERE id = ? RETURNING id",
                (now, session.id),
            )
        return session

    async def end_session(self, token_digest: str) -> None:
        await self._durable(
            "UPDATE dashboard_sessions SET revoked_at = ? WHERE token_digest = ? AND revoked_at IS NULL",
            (_now_ms(), token_digest),
        )

    async def list_sessions(self, email: str | None = None) -> list[DashboardSession]:
        """Sessions that are still live, newest first."""
        now = _now_ms()
        where = "AND l.email = ?" if email else ""
        params: tuple[Any, ...] = (now, now) + ((email.lower(),) if email else ())
        rows = await self._all(
            f"SELECT {_SESSION_COLUMNS} {_SESSION_FROM} WHERE s.revoked_at IS NULL "
            f"AND s.expires_at > ? AND s.last_seen_at + s.idle_timeout_ms > ? {where} ORDER BY s.id DESC",
            params,
        )
        return [_session(r) for r in rows]

    async def revoke_sessions(
        self, *, public_id: str | None = None, email: str | None = None, everyone: bool = False
    ) -> int:
        """Revoke one session, every session of one login, or all; returns how many."""
        params: tuple[str, ...]
        if public_id is not None:
            where, params = "public_id = ?", (public_id,)
        elif email is not None:
            where = "login_id = (SELECT id FROM dashboard_logins WHERE email = ?)"
            params = (email.lower(),)
        elif everyone:
            where, params = "1", ()
        else:
            raise ValueError("name a session, an email or everyone")
        rows = await self._durable(
            f"UPDATE dashboard_sessions SET revoked_at = ? WHERE revoked_at IS NULL AND {where} "
            "RETURNING id",
            (_now_ms(), *params),
        )
        return len(rows)

    # -- sign-in throttling ------------------------------------------------------------

    async def signin_failures(self, scope: ThrottleScope, subject: str, window_ms: int) -> int:
        """Failed sign-ins of this subject in the current window."""
        row = await self._one(
            "SELECT failures FROM dashboard_signin_failures "
            "WHERE scope = ? AND subject = ? AND window_start > ?",
            (scope.value, subject, _now_ms() - window_ms),
        )
        return int(row[0]) if row else 0

    async def record_signin_failure(self, scope: ThrottleScope, subject: str, window_ms: int) -> int:
        """Count one failure; a window older than window_ms starts again at 1."""
        now = _now_ms()
        row = await self._one(
            "INSERT INTO dashboard_signin_failures (scope, subject, window_start, failures) "
            "VALUES (?, ?, ?, 1) ON CONFLICT (scope, subject) DO UPDATE SET "
            "failures = CASE WHEN window_start <= ? THEN 1 ELSE failures + 1 END, "
            "window_start = CASE WHEN window_start <= ? THEN excluded.window_start ELSE window_start END "
            "RETURNING failures",
            (scope.value, subject, now, now - window_ms, now - window_ms),
        )
        return int(row[0])

    async def clear_signin_failures(self, scope: ThrottleScope, subject: str) -> None:
        await self._one(
            "DELETE FROM dashboard_signin_failures WHERE scope = ? AND subject = ? RETURNING 1",
            (scope.value, subject),
        )

    # -- keys ----------------------------------------------------------------------------

    async def revoke_account_key(self, account_id: int, public_id: str) -> bool:
        """Revoke a key only if it belongs to this account; False when there is no such key."""
        rows = await self._durable(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, ?) "
            "WHERE public_id = ? AND account_id = ? RETURNING id",
            (_now_ms(), public_id, account_id),
        )
        return bool(rows)

    async def keys_last_used(self, key_ids: list[int]) -> dict[int, int]:
        """When each key was last used (by a settled request); keys never used are absent."""
        result: dict[int, int] = {}
        for key_id in key_ids:
            row = await self._one("SELECT max(created_at) FROM requests WHERE key_id = ?", (key_id,))
            if row and row[0] is not None:
                result[key_id] = int(row[0])
        return result

    # -- reports -------------------------------------------------------------------------

    async def usage_by(self, account_id: int, group: UsageGroup, days: int) -> list[UsageLine]:
        """Usage of the last `days` days (UTC, today included) summed by one dimension.

        Day and route read the per-account roll-up, user the per-user one; key and agent
        session sum the account's request rows of the period.
        """
        since = _since_day(days)
        sums, request_sums = USAGE_LINE_SUMS, REQUEST_USAGE_LINE_SUMS
        start_ms = calendar.timegm(time.strptime(since, "%Y-%m-%d")) * 1000
        if group is UsageGroup.DAY or group is UsageGroup.ROUTE:
            column = group.value
            rows = await self._all(
                f"SELECT {column}, {sums} FROM usage_totals WHERE account_id = ? AND day >= ? "
                f"GROUP BY {column} ORDER BY {column}",
                (account_id, since),
            )
        elif group is UsageGroup.USER:
            rows = await self._all(
                f"SELECT coalesce(usr.name, ''), {sums} FROM usage_daily u "
                "LEFT JOIN accounts usr ON usr.id = u.user_id AND u.user_id != 0 "
                "WHERE u.account_id = ? AND u.day >= ? GROUP BY u.user_id ORDER BY 1",
                (account_id, since),
            )
        elif group is UsageGroup.KEY:
            rows = await self._all(
                f"SELECT coalesce(k.prefix || ' ' || k.name, k.prefix, ''), {request_sums} "
                "FROM requests r LEFT JOIN api_keys k ON k.id = r.key_id "
                "WHERE r.account_id = ? AND r.created_at >= ? GROUP BY r.key_id ORDER BY 1",
                (account_id, start_ms),
            )
        else:
            rows = await self._all(
                f"SELECT r.session_id, {request_sums} FROM requests r "
                "WHERE r.account_id = ? AND r.session_id IS NOT NULL AND r.created_at >= ? "
                "GROUP BY r.session_id ORDER BY min(r.created_at)",
                (account_id, start_ms),
            )
        return [UsageLine(str(r[0]).strip(), *(int(v) for v in r[1:])) for r in rows]

    async def daily_route_charges(self, account_id: int, days: int) -> list[DayRouteCharge]:
        rows = await self._all(
            "SELECT day, route, sum(charged) FROM usage_totals WHERE account_id = ? AND day >= ? "
            "GROUP BY day, route ORDER BY day, route",
            (account_id, _since_day(days)),
        )
        return [DayRouteCharge(r[0], r[1], int(r[2])) for r in rows]

    async def search_users(self, developer_id: int, text: str, limit: int = 200) -> list[Account]:
        """App users whose external id contains text."""
        escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = await self._all(
            "SELECT id, public_id, kind, name, parent_id, billing_mode, balance, held, created_at "
            "FROM accounts WHERE kind = 'user' AND parent_id = ? AND name LIKE ? ESCAPE '\\' "
            "ORDER BY name LIMIT ?",
            (developer_id, f"%{escaped}%", limit),
        )
        return [Account(*r) for r in rows]

    async def open_hold_list(self, limit: int = 100) -> list[OpenHold]:
        rows = await self._all(
            "SELECT a.name, h.amount, h.request_id, h.created_at, h.expires_at FROM holds h "
            "JOIN accounts a ON a.id = h.account_id ORDER BY h.id DESC LIMIT ?",
            (limit,),
        )
        return [OpenHold(*r) for r in rows]

    async def upstream_errors(self, since_ms: int, scan: int = 100_000) -> list[UpstreamErrors]:
        """Failed upstream outcomes per route since since_ms, among the last `scan` requests
        (a rowid range, so the operator's page stays cheap on a large store)."""
        rows = await self._all(
            "SELECT route, outcome, count(*), max(created_at) FROM requests "
            "WHERE id > (SELECT coalesce(max(id), 0) - ? FROM requests) AND created_at >= ? "
            "AND outcome LIKE 'upstream_%' GROUP BY route, outcome ORDER BY 3 DESC",
            (scan, since_ms),
        )
        return [UpstreamErrors(*r) for r in rows]
