"""Who has the model: one run at a time, in order of arrival, the requests waiting together
sharing a run (server.py's scheduling; asyncio only, no extra)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Member:
    """A request waiting for the model. It may be served by an earlier request of the same key
    (rows per prompt), which takes it into its own run (`taken`)."""

    jobs: list[Any]
    sink: Callable[[Any], None]
    cancelled: threading.Event
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None
    taken: bool = False


class Turns:
    """The model serves one run at a time, in order of arrival, with at most `limit` requests
    waiting. Requests of the same key that wait together share a run: their prompts are decoded
    in one batch, each row with its own request's settings (greedy or sampled, length, penalties,
    stop strings, seed), and each request's text is the one it gets alone (batching is exact in
    float32)."""

    def __init__(self, limit: int, rows: int) -> None:
        self.lock, self.waiting, self.limit, self.rows = asyncio.Lock(), 0, limit, rows
        self.groups: dict[str, list[Member]] = {}

    async def take_turn(self, me: Member, key: str | None,
                        run: Callable[[list[Member]], Awaitable[None]]) -> None:
        """Wait for the model, then `run` this request with the ones of the same `key` that wait
        too; or wait until an earlier request's run has served this one."""
        if key is not None:
            self.groups.setdefault(key, []).append(me)
        self.waiting += 1
        acquire, served = asyncio.ensure_future(self.lock.acquire()), asyncio.ensure_future(me.finished.wait())
        try:
            await asyncio.wait({acquire, served}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the request itself was cancelled (a shutdown): leave nothing held
            self._give_back(acquire)
            if key is not None and me in self.groups.get(key, []):
                self.groups[key].remove(me)
            raise
        finally:
            self.waiting -= 1
            served.cancel()
        if me.taken:  # served by another's run: the model is not ours
            self._give_back(acquire)
            await me.finished.wait()
            return
        members = [me, *self._companions(key, me)]
        for m in members:
            m.taken = True
            if key is not None:
                self.groups[key].remove(m)
        if key is not None and not self.groups[key]:
            del self.groups[key]
        try:
            await run(members)
        finally:
            for m in members:
                m.finished.set()
            self.lock.release()

    def _give_back(self, acquire: asyncio.Future) -> None:
        """Release the lock if `acquire` took it, else stop it from taking it."""
        if acquire.done() and not acquire.cancelled() and acquire.exception() is None:
            self.lock.release()
        acquire.cancel()

    def _companions(self, key: str | None, me: Member) -> list[Member]:
        """The waiting requests of `key` that fit beside `me` in one run."""
        chosen, rows = [], len(me.jobs)
        for m in self.groups.get(key, []) if key is not None else []:
            if m is not me and not m.cancelled.is_set() and rows + len(m.jobs) <= self.rows:
                chosen.append(m)
                rows += len(m.jobs)
        return chosen

    def full(self) -> bool:
        return self.lock.locked() and self.waiting >= self.limit

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        self.waiting += 1
        try:
            await self.lock.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self.lock.release()


class AllCancelled:
    """A shared run stops once every request in it is cancelled (`Collector` asks `is_set`)."""

    def __init__(self, members: list[Member]) -> None:
        self.members = members

    def is_set(self) -> bool:
        return all(m.cancelled.is_set() for m in self.members)
