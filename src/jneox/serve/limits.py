"""Connection limits that uvicorn lacks: a deadline for reading each request (headers and whole body),
a cap on open connections enforced when a connection is accepted, and one log line, not one per
event, when the process runs out of file descriptors.

uvicorn's own options do not cover these: ``timeout_keep_alive`` only runs between requests (the
first byte of a request cancels it, so a client that sends half a header, or a body one byte at a
time, holds its connection for ever), and ``limit_concurrency`` answers 503 only after a whole
request has been read. Out of file descriptors, asyncio's accept loop reports the failure once per
pending connection of the backlog, every second.
"""
from __future__ import annotations

import asyncio
import logging
import resource
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import DEFAULT_MAX_CONNECTIONS, DEFAULT_READ_TIMEOUT_S
FD_RESERVE = 64  # descriptors left for the model files, the log and the engine when the cap is derived
LOG_EVERY_S = 60.0  # a repeated condition is logged at most this often
log = logging.getLogger("jneox.serve")


def default_max_connections() -> int:
    """DEFAULT_MAX_CONNECTIONS, or fewer where the descriptor limit (``ulimit -n``) would run out first."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return DEFAULT_MAX_CONNECTIONS
    return max(1, min(DEFAULT_MAX_CONNECTIONS, soft - FD_RESERVE))


class Throttled:
    """A warning that may happen many times a second: logged the first time, then at most once per
    ``every`` seconds with the count of those not logged in between."""

    def __init__(self, every: float = LOG_EVERY_S):
        self.every, self.last, self.skipped = every, None, 0

    def warn(self, message: str, *args) -> None:
        now = time.monotonic()
        if self.last is not None and now - self.last < self.every:
            self.skipped += 1
            return
        more = f" (and {self.skipped} more like it in the last {now - self.last:.0f} s)" if self.skipped else ""
        log.warning(message + more, *args)
        self.last, self.skipped = now, 0


class Limits:
    """One server's limits, shared by all its connections: ``read_timeout`` seconds (None: none) to
    receive a request's headers and body, ``max_connections`` open at once."""

    def __init__(self, read_timeout: float | None = DEFAULT_READ_TIMEOUT_S, max_connections: int | None = None):
        self.read_timeout = read_timeout
        self.max_connections = default_max_connections() if max_connections is None else max_connections
        self.open = 0
        self.refused, self.timed_out = 0, 0  # counts, for tests and the attack benchmark
        self.refused_log, self.timeout_log, self.fd_log = Throttled(), Throttled(), Throttled()

    def protocol(self) -> type[H11Protocol]:
        """uvicorn's h11 protocol class enforcing these limits (``uvicorn.Config(http=...)``)."""
        limits = self

        class Guarded(GuardedH11Protocol):
            pass

        Guarded.limits = limits
        return Guarded

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Route the loop's "out of file descriptors on accept" reports through one throttled line."""
        previous = loop.get_exception_handler()

        def handler(loop, context):
            message = context.get("message", "")
            if message == "socket.accept() out of system resource":
                self.fd_log.warn("cannot accept connections: %s; the server waits for connections to close "
                                 "(lower --max-connections or raise the limit with ulimit -n)", context.get("exception"))
                return
            if "._start_serving(" in message and isinstance(context.get("exception"), ValueError):
                # asyncio's retry of accept after that error, firing after the server closed its socket
                # on shutdown: there is nothing left to serve
                log.debug("%s: %s", message, context.get("exception"))
                return
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with :class:`Limits`: a connection over the cap is closed as soon as it is
    accepted; a request whose headers and body have not all arrived ``read_timeout`` seconds after its
    first byte (or after the connection opened) is dropped with its connection."""

    limits: Limits

    def connection_made(self, transport) -> None:
        self.counted = self.limits.open < self.limits.max_connections  # in limits.open
        if not self.counted:
            self.limits.refused += 1
            self.limits.refused_log.warn("refused a connection: %d are open (--max-connections)", self.limits.open)
            transport.abort()
            return
        self.limits.open += 1
        self.deadline, self.deadline_cycle = None, None
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc) -> None:
        if not self.counted:  # refused, or handed over to a websocket protocol
            return
        self._forget()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self, event) -> None:
        self._forget()  # the websocket protocol owns the connection from here, and hears of its end
        super().handle_websocket_upgrade(event)

    def _forget(self) -> None:
        if self.counted:
            self.counted = False
            self.limits.open -= 1
        self._disarm()

    def data_received(self, data: bytes) -> None:
        if self.deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)
        self._check_read()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._check_read()  # pipelined requests start from here

    def _arm(self) -> None:
        if self.limits.read_timeout is not None:
            self.deadline_cycle = self.cycle  # the request being read is the one after this
            self.deadline = self.loop.call_later(self.limits.read_timeout, self._expired)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _check_read(self) -> None:
        """Disarm once the request being timed has been read in full (headers and the end of its body)."""
        if self.deadline is not None and self.cycle is not None and self.cycle is not self.deadline_cycle \
                and not self.cycle.more_body:
            self._disarm()

    def _expired(self) -> None:
        self.deadline = None
        if self.transport.is_closing():
            return
        self.limits.timed_out += 1
        self.limits.timeout_log.warn("closed a connection from %s: its request was not received within %g s "
                                     "(--read-timeout)", "%s:%d" % self.client if self.client else "?",
                                     self.limits.read_timeout)
        self.transport.abort()
