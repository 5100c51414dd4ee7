"""Who has the model: one run at a time, which the requests of its kind join as they arrive
(server.py's scheduling; asyncio only, no extra)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Member:
    """A request's rows: its jobs (`key`: the rows each prompt decodes), where its events go, and
    whether its client went away."""

    jobs: list[Any]
    sink: Callable[[Any], None]
    cancelled: threading.Event
    key: str = ""
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None
    taken: bool = False


class Turns:
    """Who has the model. One run at a time holds it; a request of the running run's key joins
    that run at its next step (its prompts take rows beside the others', each decoded as alone),
    and any other waits, at most `limit` of them, then starts a run of its own key."""

    def __init__(self, limit: int, rows: int) -> None:
        self.lock, self.limit, self.rows = asyncio.Lock(), limit, rows
        self.mutex = threading.Lock()  # `pending` is read by the run's thread too
        self.pending: list[Member] = []  # requests no run has taken yet
        self.others = 0  # requests waiting for the model itself (`turn`)
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def waiting(self) -> int:
        return len(self.pending) + self.others

    def full(self) -> bool:
        return self.lock.locked() and self.waiting >= self.limit

    async def take_turn(self, me: Member, run: Callable[[str], Awaitable[None]]) -> None:
        """Return once every row of `me` is done: run by the run of its key, or by `run(key)`,
        started once the model is free, which takes `me` and whoever joins it."""
        self.loop = asyncio.get_running_loop()
        with self.mutex:
            self.pending.append(me)
        acquire, served = asyncio.ensure_future(self.lock.acquire()), asyncio.ensure_future(me.finished.wait())
        try:
            await asyncio.wait({acquire, served}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the request itself was cancelled (a shutdown): leave nothing held
            self._give_back(acquire)
            with self.mutex:
                if me in self.pending:
                    self.pending.remove(me)
            raise
        finally:
            served.cancel()
        if me.taken:  # a run has its rows: the model is not ours
            self._give_back(acquire)
            await me.finished.wait()
            return
        try:
            await run(me.key)
        finally:
            self.lock.release()

    def next_member(self, key: str) -> Member | None:
        """For the run of `key` (in its thread): the next request of that key, now taken; None if
        none waits. Requests whose clients went away meanwhile are let go."""
        with self.mutex:
            for m in [m for m in self.pending if m.key == key]:
                self.pending.remove(m)
                m.taken = True
                if not m.cancelled.is_set():
                    return m
                self.finish(m)
        return None

    def waits(self, key: str) -> bool:
        with self.mutex:
            return any(m.key == key for m in self.pending)

    def finish(self, m: Member) -> None:
        """`m`'s rows are done (called from the run's thread)."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(m.finished.set)

    def _give_back(self, acquire: asyncio.Future) -> None:
        """Release the lock if `acquire` took it, else stop it from taking it."""
        if acquire.done() and not acquire.cancelled() and acquire.exception() is None:
            self.lock.release()
        acquire.cancel()

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        self.others += 1
        try:
            await self.lock.acquire()
        finally:
            self.others -= 1
        try:
            yield
        finally:
            self.lock.release()
