"""Worker processes for the symbolic path, with deadlines that hold under load.

Why processes and not signals in the caller: `signal.alarm` works only on the main thread of the main
interpreter, and sympy can sit inside one long C call (a big-integer power) that nothing interrupts. A
subprocess can always be killed. Workers are plain `subprocess.Popen` children (not `multiprocessing`), so
they can be started from threads, from daemonic pool workers and from processes that hold JAX or CUDA
state, and nothing is forked.

How the bound holds:
  - A request carries its absolute deadline (CLOCK_MONOTONIC, shared by all processes of the machine). The
    worker arms a timer for it and answers "late" when it fires; the caller waits on the same deadline.
  - A reply counts when the worker finished before the deadline, by the worker's own timestamp, however
    late the caller gets to read it (a busy machine, a neighbour's request): verdicts do not depend on
    another request's timing.
  - Workers are started, drained and replaced by a background supervisor thread, never inside a caller's
    bound. A caller that finds no ready worker waits for one until its deadline, then answers `default`.
    A worker still busy at its deadline finishes in the background (its timer stops it within
    milliseconds); one that does not answer within KILL_GRACE_S after that (stuck in C) is killed and
    replaced.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time

STARTUP_TIMEOUT_S = 120.0
KILL_GRACE_S = 1.0
WORKER_MEMORY_BYTES = 3 << 30
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Worker:
    """One grading subprocess speaking length-prefixed pickles over its stdin/stdout."""

    def __init__(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = _PACKAGE_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        # One thread each: a worker is one grading at a time, and BLAS threads would fight the pool.
        env.setdefault("OMP_NUM_THREADS", "1")
        env["JAXMATH_REWARD_WORKER_MEMORY"] = str(WORKER_MEMORY_BYTES)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jaxmath.reward.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, env=env)
        self.started_at = time.monotonic()
        self.ready = False
        self._buffer = b""
        self.dead = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def fileno(self) -> int:
        return self.process.stdout.fileno()

    def send(self, message) -> bool:
        payload = pickle.dumps(message)
        try:
            self.process.stdin.write(struct.pack("<Q", len(payload)) + payload)
            self.process.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            self.kill()
            return False

    def read_available(self) -> list:
        """The complete messages readable now, without blocking; marks the worker dead at end of file."""
        if self.dead:
            return []
        try:
            while select.select([self.fileno()], [], [], 0)[0]:
                chunk = os.read(self.fileno(), 1 << 20)
                if not chunk:
                    self.kill()
                    break
                self._buffer += chunk
        except (OSError, ValueError):
            self.kill()
        messages = []
        while len(self._buffer) >= 8:
            size = struct.unpack("<Q", self._buffer[:8])[0]
            if len(self._buffer) < 8 + size:
                break
            payload, self._buffer = self._buffer[8:8 + size], self._buffer[8 + size:]
            messages.append(pickle.loads(payload))
        return messages

    def kill(self) -> None:
        """Kills the process without waiting for it (the supervisor reaps it)."""
        self.dead = True
        if self.process.poll() is None:
            try:
                self.process.kill()
            except OSError:
                pass
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass


class _Pool:
    """Shared state of this process's workers; one supervisor thread keeps it healthy."""

    def __init__(self):
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.idle: collections.deque[Worker] = collections.deque()
        self.starting: list[Worker] = []
        self.draining: dict[Worker, tuple[int, float]] = {}  # worker -> (request id, kill time)
        self.busy = 0
        self.waiting = 0
        self.wanted = 0  # workers to keep, ready or busy
        self.ids = itertools.count(1)
        self.zombies: list[Worker] = []
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_write, False)
        self.thread = threading.Thread(target=self._supervise, name="jaxmath-reward-pool", daemon=True)
        self.thread.start()

    def wake(self) -> None:
        try:
            os.write(self.wake_write, b"x")
        except (BlockingIOError, OSError):
            pass

    def _deficit(self) -> int:
        live = len(self.idle) + len(self.starting) + len(self.draining) + self.busy
        return max(self.wanted, self.busy + self.waiting) - live

    def _supervise(self) -> None:
        while True:
            with self.lock:
                deficit = self._deficit()
            for _ in range(max(0, deficit)):
                try:
                    worker = Worker()
                except OSError:
                    break
                with self.lock:
                    self.starting.append(worker)
            with self.lock:
                watched = self.starting + list(self.draining)
                now = time.monotonic()
                next_kill = min([kill_at for _, kill_at in self.draining.values()], default=now + 0.5)
            timeout = min(0.5, max(0.0, next_kill - now))
            try:
                readable, _, _ = select.select([self.wake_read] + [w.fileno() for w in watched if not w.dead], [], [], timeout)
            except (OSError, ValueError):
                readable = []
            if self.wake_read in readable:
                os.read(self.wake_read, 4096)
            self._tend(watched)

    def _tend(self, watched: list[Worker]) -> None:
        now = time.monotonic()
        with self.lock:
            for worker in watched:
                messages = worker.read_available()
                if worker in self.starting:
                    if "ready" in messages:
                        worker.ready = True
                        self.starting.remove(worker)
                        self.idle.append(worker)
                        self.changed.notify_all()
                    elif worker.dead or now - worker.started_at > STARTUP_TIMEOUT_S:
                        worker.kill()
                        self.starting.remove(worker)
                        self.zombies.append(worker)
                elif worker in self.draining:
                    request_id, kill_at = self.draining[worker]
                    if any(isinstance(m, tuple) and m[0] == request_id for m in messages) and not worker.dead:
                        del self.draining[worker]
                        self.idle.append(worker)
                        self.changed.notify_all()
                    elif worker.dead or now > kill_at:
                        worker.kill()
                        del self.draining[worker]
                        self.zombies.append(worker)
            self.zombies = [w for w in self.zombies if w.process.poll() is None]

    def acquire(self, deadline: float) -> Worker | None:
        """An idle ready worker, waiting for one until `deadline`; None if none came in time."""
        with self.lock:
            self.waiting += 1
            try:
                if not self.idle:
                    self.wake()
                while not self.idle:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    self.changed.wait(remaining)
                worker = self.idle.popleft()
                self.busy += 1
                return worker
            finally:
                self.waiting -= 1

    def try_acquire(self) -> Worker | None:
        with self.lock:
            if not self.idle:
                return None
            self.busy += 1
            return self.idle.popleft()

    def release(self, worker: Worker) -> None:
        with self.lock:
            self.busy -= 1
            if worker.dead:
                self.zombies.append(worker)
                self.wake()
            else:
                self.idle.append(worker)
                self.changed.notify_all()

    def abandon(self, worker: Worker, request_id: int, deadline: float) -> None:
        """A worker whose request is past its deadline: the supervisor waits for its late reply."""
        with self.lock:
            self.busy -= 1
            if worker.dead:
                self.zombies.append(worker)
            else:
                self.draining[worker] = (request_id, deadline + KILL_GRACE_S)
        self.wake()

    def want(self, count: int) -> None:
        with self.lock:
            self.wanted = count
        self.wake()

    def stop_all(self) -> None:
        with self.lock:
            workers = list(self.idle) + self.starting + list(self.draining)
            self.idle.clear()
            self.starting.clear()
            self.draining.clear()
            self.wanted = 0
        for worker in workers:
            worker.kill()
            try:
                worker.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


_pool: _Pool | None = None
_pool_pid: int | None = None
_pool_lock = threading.Lock()


def _get_pool() -> _Pool:
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            # After a fork the parent's workers and supervisor are not ours.
            _pool, _pool_pid = _Pool(), os.getpid()
        return _pool


def _outcome(messages: list, request_id: int, deadline: float):
    """(found, counted, result) for the reply to `request_id` among `messages`."""
    for message in messages:
        if isinstance(message, tuple) and message[0] == request_id:
            _, finished_at, status, result = message
            return True, status == "ok" and finished_at <= deadline, result
    return False, False, None


def call(request, deadline: float, default=False):
    """Runs `request` on a worker and returns its reply, or `default` when no reply is had by `deadline`
    (absolute `time.monotonic()` seconds). Safe from any thread."""
    pool = _get_pool()
    worker = pool.acquire(deadline)
    if worker is None:
        return default
    request_id = next(pool.ids)
    if not worker.send((request_id, deadline, request)):
        pool.release(worker)
        return default
    while True:
        remaining = deadline - time.monotonic()
        if remaining > 0:
            try:
                select.select([worker.fileno()], [], [], remaining)
            except (OSError, ValueError):
                pass
        found, counted, result = _outcome(worker.read_available(), request_id, deadline)
        if found:
            pool.release(worker)
            return result if counted else default
        if worker.dead or time.monotonic() >= deadline:
            pool.abandon(worker, request_id, deadline)
            return default


def call_bounded(request, timeout: float, default=False):
    """`call` with a relative timeout in seconds."""
    return call(request, time.monotonic() + timeout, default)


def run_batch(requests: list, workers: int, timeout: float, default=False, budget: float | None = None) -> list:
    """Runs `requests` on up to `workers` processes at once, each within `timeout` seconds from when its
    worker takes it; keeps the order. A request whose worker dies or runs past its deadline gets
    `default`; the batch goes on with the other workers while a replacement starts.

    `budget` (seconds from the call) bounds the whole batch: requests still waiting for a worker when it
    runs out get `default`, and none runs past it (workers that are slow to start, or replaced after a
    crash, are what could otherwise stretch a batch)."""
    pool = _get_pool()
    batch_deadline = time.monotonic() + budget if budget is not None else float("inf")
    results = [default] * len(requests)
    pending = collections.deque(range(len(requests)))
    in_flight: dict[Worker, tuple[int, int, float]] = {}  # worker -> (index, request id, deadline)
    with pool.lock:
        previous_wanted = pool.wanted
    pool.want(max(previous_wanted, min(workers, len(requests))))
    try:
        while pending or in_flight:
            while pending and len(in_flight) < workers:
                worker = pool.try_acquire()
                if worker is None:
                    break
                index = pending.popleft()
                request_id = next(pool.ids)
                deadline = min(time.monotonic() + timeout, batch_deadline)
                if worker.send((request_id, deadline, requests[index])):
                    in_flight[worker] = (index, request_id, deadline)
                else:
                    pool.release(worker)
                    pending.appendleft(index)
            now = time.monotonic()
            if now >= batch_deadline and pending:
                pending.clear()  # out of budget: what has not started gets `default`
            wait = min([deadline for _, _, deadline in in_flight.values()], default=now + 0.05) - now
            if pending and len(in_flight) < workers:
                wait = min(wait, 0.02)  # poll for a worker becoming ready
            try:
                select.select([w.fileno() for w in in_flight if not w.dead], [], [], max(0.0, wait))
            except (OSError, ValueError):
                pass
            for worker, (index, request_id, deadline) in list(in_flight.items()):
                found, counted, result = _outcome(worker.read_available(), request_id, deadline)
                if found:
                    results[index] = result if counted else default
                    del in_flight[worker]
                    pool.release(worker)
                elif worker.dead or time.monotonic() >= deadline:
                    del in_flight[worker]
                    pool.abandon(worker, request_id, deadline)
        return results
    finally:
        for worker, (_, request_id, deadline) in in_flight.items():
            pool.abandon(worker, request_id, deadline)
        pool.want(previous_wanted)


def warmup(count: int = 1, wait: bool = True, timeout: float = STARTUP_TIMEOUT_S) -> None:
    """Keeps `count` workers started from now on; with `wait`, returns once they are ready (or after
    `timeout`), so that the first symbolic gradings do not wait for a start."""
    pool = _get_pool()
    pool.want(max(count, pool.wanted))
    if not wait:
        return
    deadline = time.monotonic() + timeout
    with pool.lock:
        while len(pool.idle) + pool.busy < count and time.monotonic() < deadline:
            pool.changed.wait(max(0.0, min(0.5, deadline - time.monotonic())))


def shutdown() -> None:
    """Kills this process's workers (they also exit on their own when their stdin closes)."""
    if _pool is not None and _pool_pid == os.getpid():
        _pool.stop_all()


def worker_pids() -> list[int]:
    """Process ids of the live workers (for tests)."""
    pool = _get_pool()
    with pool.lock:
        return [w.pid for w in list(pool.idle) + pool.starting + list(pool.draining)]


atexit.register(shutdown)
