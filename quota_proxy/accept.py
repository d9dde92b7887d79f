"""Accept every connection that is waiting, not one per event-loop turn.

libuv (uvloop's core) accepts a single connection each time the loop polls a listening
socket (libuv PR #3696, "unix: don't accept() connections in a loop"), leaving the rest to the
next turn. When the gateway is busy, a turn takes milliseconds, so a burst of new
connections drains from the kernel's accept queue one turn at a time: 64 clients
connecting to a saturated worker waited up to 0.2 s for their first byte to be read
(bench/RESULTS.md, *The c=64 tail*). Here, each accepted connection accepts whatever else
is waiting, up to MAX_PER_DRAIN, and hands it to the loop as an ordinary transport.

Only a process that is the only one accepting on its sockets does this (`serve` with one
worker, the in-process runner): with several workers on one socket, a busy worker taking
the whole queue would starve its idle siblings, which libuv's one-at-a-time accept avoids.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
from collections.abc import Callable, Iterable

from uvicorn.config import Config
from uvicorn.server import Server, ServerState

logger = logging.getLogger("quota_proxy.server")

# At most this many connections per drain (the loop serves what it took before the rest).
MAX_PER_DRAIN = 256


class Acceptor:
    """Accepts the connections waiting on a server's listening sockets."""

    def __init__(
        self,
        listeners: Iterable[socket.socket],
        protocol_factory: Callable[[], asyncio.Protocol],
        loop: asyncio.AbstractEventLoop,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        # Our own descriptors of the same listening sockets (closed in close(), so that a
        # server that stops listening is not kept listening by them).
        self._listeners = [socket.fromfd(s.fileno(), s.family, s.type) for s in listeners]
        for listener in self._listeners:
            listener.setblocking(False)
        self._factory = protocol_factory
        self._loop = loop
        self._ssl = ssl_context
        self._opening: set[asyncio.Task[object]] = set()  # referenced until done

    def drain(self) -> int:
        """Accept what is waiting now; returns how many connections were taken."""
        taken = 0
        for listener in self._listeners:
            while taken < MAX_PER_DRAIN:
                try:
                    conn, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:  # out of descriptors, aborted, closed: the loop's own accept copes
                    logger.debug("accept failed: %s", exc)
                    break
                taken += 1
                self._hand_over(conn)
        return taken

    def _hand_over(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            # As the loop's own transports: every answer goes out without waiting for an ACK.
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A coroutine: whatever fails in it is logged by _opened, and the socket is closed with it.
        opening = self._loop.connect_accepted_socket(self._factory, conn, ssl=self._ssl)
        task: asyncio.Task[object] = self._loop.create_task(opening)
        self._opening.add(task)
        task.add_done_callback(self._opened)

    def _opened(self, task: asyncio.Task[object]) -> None:
        self._opening.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("a waiting connection could not be opened: %s", task.exception())

    def close(self) -> None:
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener.close()


class AcceptingServerState(ServerState):
    """uvicorn's shared server state, with the Acceptor its connections call on."""

    acceptor: Acceptor | None = None


class GreedyAcceptServer(Server):
    """A uvicorn server whose connections accept the ones waiting behind them. Use it only
    where this process is the only one accepting on its sockets (see the module's note)."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.server_state = self.accepting = AcceptingServerState()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        config = self.config
        protocol_class: Callable[..., asyncio.Protocol] = config.http_protocol_class
        factory = functools.partial(
            protocol_class,  # as uvicorn's own startup() builds each connection's protocol
            config=config,
            server_state=self.server_state,
            app_state=self.lifespan.state,
        )
        listeners = [s for server in self.servers for s in (server.sockets or ())]
        self.accepting.acceptor = Acceptor(listeners, factory, asyncio.get_running_loop(), config.ssl)

    def stop_accepting(self) -> None:
        acceptor, self.accepting.acceptor = self.accepting.acceptor, None
        if acceptor is not None:
            acceptor.close()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.stop_accepting()
        await super().shutdown(sockets)


def drain_waiting(server_state: ServerState) -> None:
    """Called by each new connection: accept the ones queued behind it."""
    if isinstance(server_state, AcceptingServerState) and server_state.acceptor is not None:
        server_state.acceptor.drain()
