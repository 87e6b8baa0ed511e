"""The event stream's engine: LISTEN on one dedicated connection, read the event log, fan out.

NOTIFY only wakes the broadcaster; what it delivers is always read from the `events` table,
after the last id it delivered. So a notification lost while the listening connection was
down costs nothing: after reconnecting the broadcaster reads on from where it stopped, and
its subscribers see no hole. The listening connection is never a pooled one: releasing a
connection to the pool runs UNLISTEN.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

import asyncpg
from aiohttp import web

from prerec import db, tasks
from prerec.cache import MetadataCache
from prerec.model import Event

log = logging.getLogger(__name__)

# How many undelivered events one subscriber may have waiting before it is dropped as too
# slow (it can come back with Last-Event-ID); bounds memory whatever a client does.
QUEUE_SIZE = 1000
REPLAY_PAGE = 500
HEALTH_INTERVAL_SECONDS = 2.0
PRUNE_BATCH = 10_000
MAX_BACKOFF_SECONDS = 5.0


@dataclass(eq=False)
class Subscriber:
    types: frozenset[str]
    # Id of the last event this subscriber has passed (sent or filtered out).
    position: int
    queue: asyncio.Queue[Event] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""
    too_slow: bool = False

    def offer(self, event: Event) -> None:
        if event.type not in self.types or self.closed.is_set():
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.too_slow = True
            self.close("too slow: its queue of undelivered events is full")

    def close(self, reason: str) -> None:
        if not self.closed.is_set():
            self.reason = reason
            self.closed.set()

    async def next_live(self) -> Event | None:
        """The next queued event, or None once the subscriber is closed."""
        if self.closed.is_set():
            return None
        if not self.queue.empty():
            return self.queue.get_nowait()
        getter = asyncio.ensure_future(self.queue.get())
        closer = asyncio.ensure_future(self.closed.wait())
        try:
            await asyncio.wait((getter, closer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            closer.cancel()
            if not getter.done():
                getter.cancel()
        return getter.result() if getter.done() and not getter.cancelled() else None


class Broadcaster:
    def __init__(
        self,
        url: str,
        pool: asyncpg.Pool,
        timeout: float,
        retention_seconds: float,
        cache: MetadataCache,
        on_reconnect: Callable[[], None] = lambda: None,
        upload_owner: str | None = None,
        on_upload_notice: Callable[[str], None] | None = None,
    ) -> None:
        self.url = url
        # Requests to this process as an upload's lease holder come on the same connection,
        # whose backend pid stamps the leases (see db.acquire_lease).
        self.upload_owner = upload_owner
        self.on_upload_notice = on_upload_notice
        self.on_reconnect = on_reconnect
        self.cache = cache
        self.pool = pool
        self.timeout = timeout
        self.retention_seconds = retention_seconds
        # Subscribers in the live fan-out; `streams` also has those still replaying the log.
        self.subscribers: set[Subscriber] = set()
        self.streams: set[Subscriber] = set()
        # Id of the last event read from the log and fanned out.
        self.last_id = 0
        self.connected = asyncio.Event()
        self._listener: asyncpg.Connection | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    async def start(self) -> None:
        async with db.connection(self.pool, self.timeout) as conn:
            self.last_id = await db.latest_event_id(conn)
        await self._connect()
        self._tasks = [
            asyncio.create_task(self._deliver_forever(), name="delivery"),
            asyncio.create_task(self._watch(), name="listener watch"),
            asyncio.create_task(self._prune_forever(), name="event log pruning"),
        ]

    async def close(self) -> None:
        """End the streams, stop the tasks, close the listener: each step bounded, as a
        database that hangs must not hold the shutdown."""
        self._closing = True
        self.end_streams("the server is shutting down")
        await asyncio.gather(
            *(tasks.stop(task, self.timeout, f"the broadcaster's {task.get_name()}") for task in self._tasks)
        )
        if self._listener is not None:
            try:
                # The goodbye waits for the server to hang up; a frozen one never does.
                async with asyncio.timeout(self.timeout):
                    await self._listener.close()
            except Exception as error:
                log.warning("could not close the listening connection in %.1f s (%r); dropped it", self.timeout, error)
                self._listener.terminate()

    def end_streams(self, reason: str) -> None:
        for subscriber in list(self.streams):
            subscriber.close(reason)

    # The listening connection

    async def _connect(self) -> None:
        conn = await asyncpg.connect(self.url, timeout=self.timeout)
        await conn.add_listener(db.NOTIFY_CHANNEL, self._notified)
        if self.on_upload_notice is not None:
            await conn.add_listener(db.UPLOADS_CHANNEL, self._upload_notified)
        conn.add_termination_listener(self._terminated)
        self._listener = conn
        if self.upload_owner is not None:
            # The leases this process holds name the old connection's backend, which other
            # replicas would now take for a dead holder's.
            try:
                async with db.connection(self.pool, self.timeout) as pooled:
                    await db.restamp_leases(pooled, self.upload_owner, conn.get_server_pid())
            except Exception as error:
                log.warning("could not restamp this process's upload leases: %r", error)
        self.connected.set()
        self.cache.enable()
        # Whatever was committed while no one listened is in the log: read on from last_id.
        self._wake.set()

    def _notified(self, conn: object, pid: int, channel: str, payload: str) -> None:
        self._wake.set()

    def _upload_notified(self, conn: object, pid: int, channel: str, payload: str) -> None:
        assert self.on_upload_notice is not None
        self.on_upload_notice(payload)

    @property
    def listener_pid(self) -> int | None:
        """The backend pid of the listening connection, while it is up."""
        if self._listener is None or not self.connected.is_set():
            return None
        return self._listener.get_server_pid()

    def _terminated(self, conn: object) -> None:
        if conn is self._listener and not self._closing:
            log.warning("listening connection lost; reconnecting")
            self.connected.clear()
            self.cache.disable()

    async def _watch(self) -> None:
        """Notice a dead listener (the termination callback does not fire for every way a
        connection can die) and reconnect with backoff."""
        backoff = 0.1
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_SECONDS if self.connected.is_set() else backoff)
            if self.connected.is_set():
                try:
                    assert self._listener is not None
                    await db.ping(self._listener, self.timeout)
                    backoff = 0.1
                    continue
                except (asyncio.CancelledError, KeyboardInterrupt):
                    raise
                except Exception as error:
                    log.warning("listening connection failed its health check (%r); reconnecting", error)
                    self.connected.clear()
                    self.cache.disable()
            if self._listener is not None:
                self._listener.terminate()
                self._listener = None
            try:
                await self._connect()
                self.on_reconnect()
                log.info("listening connection restored; reading events after id %d", self.last_id)
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception as error:
                log.debug("reconnect failed: %r", error)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    async def _deliver_forever(self) -> None:
        backoff = 0.1
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._deliver_new()
                backoff = 0.1
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception as error:
                # Nothing is lost: the next read goes on from last_id. Try again soon rather
                # than wait for the next change, which may be hours away.
                log.warning("could not read the event log: %r", error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
                self._wake.set()

    async def _deliver_new(self) -> None:
        while True:
            async with db.connection(self.pool, self.timeout) as conn:
                events = await db.events_after(conn, self.last_id, REPLAY_PAGE)
            for event in events:
                self.cache.evict_for(event.data)
                for subscriber in list(self.subscribers):
                    subscriber.offer(event)
                self.last_id = event.id
            if len(events) < REPLAY_PAGE:
                return

    async def _prune_forever(self) -> None:
        """Drop events older than the retention, in batches, so no long lock is ever held.

        Every replica prunes; deleting what another replica already deleted is harmless."""
        while True:
            try:
                while True:
                    async with db.connection(self.pool, self.timeout) as conn:
                        removed = await db.prune_events(conn, self.retention_seconds, PRUNE_BATCH)
                    if removed < PRUNE_BATCH:
                        break
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception as error:
                log.warning("could not prune the event log: %r", error)
            await asyncio.sleep(min(self.retention_seconds / 10, 600))

    # Subscriptions

    @contextlib.asynccontextmanager
    async def subscribe(self, types: Iterable[str], after_id: int | None) -> AsyncIterator[Subscriber]:
        """A subscriber, live at once, or (with after_id) first replaying the log after that id.

        Reading the newest id here, before the response starts, is what makes a resume
        during a database outage a 503 rather than an empty stream.
        """
        subscriber = Subscriber(frozenset(types), position=self.last_id)
        self.streams.add(subscriber)
        if after_id is None:
            self.subscribers.add(subscriber)
        try:
            if after_id is not None:
                async with db.connection(self.pool, self.timeout) as conn:
                    newest = await db.latest_event_id(conn)
                # An id from the future (or from a replica further ahead) replays nothing.
                subscriber.position = min(after_id, newest)
            yield subscriber
        finally:
            self.subscribers.discard(subscriber)
            self.streams.discard(subscriber)

    async def events(self, subscriber: Subscriber) -> AsyncIterator[Event]:
        """The subscriber's events in id order: the replay from the log, then live ones.

        A replaying subscriber is kept out of the fan-out, so a long replay cannot overflow its
        live queue. It joins once it has caught up with what this broadcaster delivered; the
        check and the join happen with no await between them, so the seam has neither a gap
        nor a duplicate (live events it already read from the log are skipped by id).
        """
        while subscriber not in self.subscribers and not subscriber.closed.is_set():
            if subscriber.position >= self.last_id:
                self.subscribers.add(subscriber)
                break
            async with db.connection(self.pool, self.timeout) as conn:
                page = await db.events_after(conn, subscriber.position, REPLAY_PAGE)
            if not page:  # the rest was pruned meanwhile: nothing more to replay
                self.subscribers.add(subscriber)
                break
            for event in page:
                subscriber.position = event.id
                if event.type in subscriber.types:
                    yield event
        while (event := await subscriber.next_live()) is not None:
            if event.id <= subscriber.position:
                continue
            subscriber.position = event.id
            yield event


BROADCASTER = web.AppKey("broadcaster", Broadcaster)
