"""Recently read prerecordings, so that HEAD and GET (playout, the web UI's HEAD per listed
item) need no database round trip.

Two things keep an entry honest, each enough in the common case and together covering the
rare ones:
- every change's event (delivered to this process by the broadcaster) evicts its key, and
  while the listener is disconnected nothing is cached or served from the cache;
- blobs are immutable and a replaced or deleted one is moved out of blobs/ right after its
  commit, so the handler finds a stale entry's file gone, evicts it and asks the database.
A read that raced with an event (the event arrived while the row was being read) is not
stored: `token()` before the read, `put(..., token)` after it.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from cachetools import LRUCache

from prerec.model import Prerecording

Key = tuple[str, str]  # (event, start) in canonical form, as events carry them

MAX_ENTRIES = 10_000


class MetadataCache:
    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._entries: LRUCache[Key, Prerecording] = LRUCache(max_entries)
        self._generation = 0
        self.enabled = False

    def get(self, key: Key) -> Prerecording | None:
        return self._entries.get(key) if self.enabled else None

    def token(self) -> int:
        return self._generation

    def put(self, key: Key, prerecording: Prerecording, token: int) -> None:
        if self.enabled and token == self._generation:
            self._entries[key] = prerecording

    def evict(self, key: Key) -> None:
        self._generation += 1
        self._entries.pop(key, None)

    def evict_for(self, data: dict[str, Any]) -> None:
        """Evict what an event's data names."""
        item = data.get("prerecording") or {}
        if "event" in item and "start" in item:
            self.evict((item["event"], item["start"]))

    def disable(self) -> None:
        """Events may be missed from now on: forget everything and cache nothing."""
        self.enabled = False
        self._generation += 1
        self._entries.clear()

    def enable(self) -> None:
        self.enabled = True


CACHE = web.AppKey("cache", MetadataCache)
