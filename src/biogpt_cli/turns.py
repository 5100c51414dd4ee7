"""Who has the model: one run at a time, which the requests of its kind join as they arrive
(server.py's scheduling; asyncio only, no extra). Fair to other kinds: once a request of another
kind (another `n`, an embedding, an echo) has waited `patience` seconds, the run takes no request
that arrived after it, drains, and hands the model on in order of arrival."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
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
    since: float = field(default_factory=time.monotonic)  # when it arrived
    joined: float | None = None  # when its rows first joined a batch
    delivered: dict[int, int] = field(default_factory=dict)  # events of each row seen in its batch
    skip: dict[int, int] = field(default_factory=dict)  # ... of them handed on before its batch failed


class Turns:
    """Who has the model. One run at a time holds it; a request of the running run's key joins
    that run at its next step (its prompts take rows beside the others', each decoded as alone),
    and any other waits, at most `limit` of them, then starts a run of its own key."""

    def __init__(self, limit: int, rows: int, patience: float = math.inf) -> None:
        self.lock, self.limit, self.rows, self.patience = asyncio.Lock(), limit, rows, patience
        self.mutex = threading.Lock()  # `pending` is read by the run's thread too
        self.pending: list[Member] = []  # requests no run has taken yet
        self.others: list[float] = []  # since when each request waiting for the model itself (`turn`) waits
        self.running = 0  # requests decoding, or holding the model (`turn`)
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def waiting(self) -> int:
        return len(self.pending) + len(self.others)

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
        none may join now. Requests whose clients went away meanwhile are let go."""
        with self.mutex:
            for m in self._joining(key):
                self.pending.remove(m)
                m.taken = True
                if not m.cancelled.is_set():
                    self.running += 1
                    return m
                self._wake(m)
        return None

    def waits(self, key: str) -> bool:
        with self.mutex:
            return bool(self._joining(key))

    def _joining(self, key: str) -> list[Member]:
        """The requests of `key` that may join its run now: all of them, or, once a request of
        another kind has waited past `patience`, those that arrived before it."""
        oldest = min([*self.others, *(m.since for m in self.pending if m.key != key)], default=math.inf)
        cutoff = oldest if time.monotonic() - oldest > self.patience else math.inf
        return [m for m in self.pending if m.key == key and m.since <= cutoff]

    def finish(self, m: Member) -> None:
        """`m`'s rows are done (called from the run's thread)."""
        self._count(-1)
        self._wake(m)

    def retry(self, m: Member) -> None:
        """`m` goes back to the front of the queue (its batch failed through no fault of its own);
        the events it was handed already are not handed again."""
        with self.mutex:
            self.running -= 1
            m.taken = False
            self.pending.insert(0, m)

    def _wake(self, m: Member) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(m.finished.set)

    def _give_back(self, acquire: asyncio.Future) -> None:
        """Release the lock if `acquire` took it, else stop it from taking it."""
        if acquire.done() and not acquire.cancelled() and acquire.exception() is None:
            self.lock.release()
        acquire.cancel()

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """The model alone (an embedding, an echo), in order of arrival."""
        since = time.monotonic()
        self.others.append(since)
        try:
            await self.lock.acquire()
        finally:
            self.others.remove(since)
        self._count(1)
        try:
            yield
        finally:
            self._count(-1)
            self.lock.release()

    def _count(self, n: int) -> None:
        with self.mutex:
            self.running += n
