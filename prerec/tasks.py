"""Stopping background tasks at shutdown without ever waiting on them without bound."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


async def stop(task: asyncio.Task[None], timeout: float, name: str) -> None:
    """Cancel `task` and wait for it to end: at most `timeout` after each of two cancellations.

    Twice, because one cancellation can be lost: on Python 3.11 asyncio.wait_for (in a library,
    say) swallows a cancellation that arrives just as what it awaited finished, and the task
    runs on. Past the second wait the task is given up, named in the log: a shutdown that
    hangs until SIGKILL would lose more than a task left unfinished.
    """
    for _ in range(2):
        task.cancel()
        done, _pending = await asyncio.wait({task}, timeout=timeout)
        if done:
            if not task.cancelled() and task.exception() is not None:
                log.error("%s had failed before it was stopped", name, exc_info=task.exception())
            return
    log.warning("%s did not stop within %.1f s of being cancelled twice; leaving it", name, 2 * timeout)
