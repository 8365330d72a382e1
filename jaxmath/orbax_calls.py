"""How jaxmath.checkpoint calls orbax: every call finishes all the work it started, and its error logs
are held back or cut to one line.

Two orbax habits make failures noisy and racy; this module corrects them:

- Orbax runs each call's coroutines in a fresh event loop and closes the loop when the call
  returns or raises, without finishing the tasks still pending in it. When one array of a damaged
  checkpoint fails to read, or one file of a save fails on a full disk, the reads or writes of the
  other arrays are abandoned mid-flight: TensorStore finishes them later in its own threads (a
  write can recreate `<step>.orbax-checkpoint-tmp` after the caller removed it; its callback hits
  "Event loop is closed"), and when the garbage collector finds an abandoned read, orbax turns
  the GeneratorExit into "Encountered error while reading array index", which Python prints as an
  unraisable exception in whatever code runs then. `install` replaces orbax's loop runner with one
  that waits for every task the call started before closing the loop, so nothing outlives the call.
  A failed save also leaves orbax's writer threads running for the items that did not fail;
  `join_background_work` waits for them before the caller removes the partial step.
- Orbax logs an error (a traceback from each of its threads) for a failure that also reaches the
  caller as an exception. While jaxmath.checkpoint is inside an orbax call (`holding_errors`), those
  records are held back (shown with --verbosity=1), since the caller reports the failure in one
  line; outside such calls they are cut to their first line.

Boundary: process-wide corrections of orbax's behaviour and the one-line wording of errors; nothing
about what a checkpoint contains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging as pylogging
import os
import re
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any

from absl import logging
from orbax.checkpoint._src import asyncio_utils
from orbax.checkpoint._src.futures import future as orbax_future

# How long a failed call waits for the work it abandoned (reads or writes of other arrays): long
# enough for any local write to end, short enough that a hung network mount does not hang the run.
JOIN_TIMEOUT_SECONDS = 120.0


def one_line(text: Any, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def os_errno(error: BaseException) -> int | None:
    """The OS error number behind `error`, if any (TensorStore reports it as `[os_error_code='28']`
    inside a ValueError)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return seen.errno
        match = re.search(r"os_error_code='?(\d+)", str(seen))
        if match:
            return int(match.group(1))
        seen = seen.__cause__ or seen.__context__
    return None


def reason(error: BaseException) -> str:
    """What went wrong, in a few words: the OS error if there is one, else the exception's first 240
    characters."""
    number = os_errno(error)
    return os.strerror(number) if number else one_line(f"{type(error).__name__}: {error}")


# -- every task finished before the call returns -----------------------------------------------------


def run_sync_joining_every_task(coro: Coroutine) -> Any:
    """Orbax's `asyncio_utils._run_sync_via_new_loop` (a fresh loop per call, no `asyncio.run`, whose
    teardown races across threads), except that the tasks the call created are awaited before the
    loop closes, also when the call raised. Their own errors are the same failure, already raised."""
    loop = asyncio.new_event_loop()
    started: list[asyncio.Task] = []

    def recording_task_factory(loop, coro, **kwargs):  # kwargs: `context` (Python >= 3.11)
        task = asyncio.Task(coro, loop=loop, **kwargs)
        started.append(task)
        return task

    loop.set_task_factory(recording_task_factory)
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    finally:
        try:
            pending = [task for task in started if not task.done()]
            if pending:
                loop.run_until_complete(asyncio.wait(pending, timeout=JOIN_TIMEOUT_SECONDS))
            for task in pending:
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: asyncio would log it as "never retrieved"
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def join_background_work(timeout: float = JOIN_TIMEOUT_SECONDS) -> None:
    """Waits for orbax's background writers (the threads of its commit futures) still running.

    After a save fails, the writes of the items that did not fail go on in these threads, which
    nothing joins (orbax stops waiting at the first error): they would land in the partial step
    directory after the caller removed it, and log errors long after the failure was reported."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if isinstance(thread, orbax_future._SignalingThread) and thread is not threading.current_thread():
            # Thread.join, not the subclass's, which re-raises the thread's error (already reported).
            threading.Thread.join(thread, max(0.0, deadline - time.monotonic()))


# -- orbax's error logs --------------------------------------------------------------------------------

# Orbax error records raised while jaxmath is inside an orbax call, innermost call last.
_held: list[list[pylogging.LogRecord]] = []


class _OrbaxErrorFilter(pylogging.Filter):
    """Holds back or shortens orbax's error logs (see the module docstring)."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        if record.levelno < pylogging.ERROR or "orbax" not in record.pathname.replace(os.sep, "/").split("/"):
            return True
        if _held:
            _held[-1].append(record)
            return False
        record.msg, record.args = "orbax: " + one_line(record.getMessage()), ()
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = pylogging.WARNING, "WARNING"
        return True


def install() -> None:
    """Applies both corrections (idempotent)."""
    absl_logger = pylogging.getLogger("absl")
    if not any(isinstance(f, _OrbaxErrorFilter) for f in absl_logger.filters):
        absl_logger.addFilter(_OrbaxErrorFilter())
    if not (hasattr(asyncio_utils, "_run_sync_via_new_loop") and hasattr(orbax_future, "_SignalingThread")):
        raise ImportError("this orbax-checkpoint lacks asyncio_utils._run_sync_via_new_loop or "
                          "futures.future._SignalingThread, which jaxmath.orbax_calls relies on; pin "
                          "orbax-checkpoint to a version that has them")
    asyncio_utils._run_sync_via_new_loop = run_sync_joining_every_task


def hold(records: list[pylogging.LogRecord]) -> None:
    """Starts holding orbax's error records into `records` (until `release(records)`)."""
    _held.append(records)


def release(records: list[pylogging.LogRecord]) -> None:
    """Stops holding into `records` (found by identity: two empty lists are equal)."""
    for i, candidate in enumerate(_held):
        if candidate is records:
            del _held[i]
            return


@contextlib.contextmanager
def holding_errors() -> Iterator[list[pylogging.LogRecord]]:
    """Holds orbax's error records back while inside; they are logged at debug level on the way out."""
    records: list[pylogging.LogRecord] = []
    hold(records)
    try:
        yield records
    finally:
        release(records)
        for record in records:  # shown with --verbosity=1
            logging.debug("orbax (held back): %s", one_line(record.getMessage(), 2000))
