"""Worker processes with hard wall-clock bounds, for the symbolic path and for batch grading.

Why processes and not signals: `signal.alarm` works only on the main thread of the main interpreter,
and sympy can sit inside one long C call (a big-integer power) that no Python-level flag interrupts.
A subprocess can always be killed. Workers are plain `subprocess.Popen` children (not
`multiprocessing`), so they can be started from threads, from daemonic pool workers and from
processes that hold JAX or CUDA state, and nothing is forked.

A worker is started once and reused; one that runs past its deadline or dies is killed and replaced.
Startup (python + sympy + the ANTLR parser, about a second) happens before the deadline of the first
request that needs it; `warmup()` moves it out of the way.
"""

from __future__ import annotations

import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time

STARTUP_TIMEOUT_S = 60.0
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class WorkerError(RuntimeError):
    """The worker died or ran past its deadline; it has been killed."""


class Worker:
    """One grading subprocess speaking length-prefixed pickles over its stdin/stdout."""

    def __init__(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = _PACKAGE_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        # One thread each: a worker is one grading at a time, and BLAS threads would fight the pool.
        env.setdefault("OMP_NUM_THREADS", "1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jaxmath.reward.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        self._ready = False
        self._buffer = b""

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def fileno(self) -> int:
        return self.process.stdout.fileno()

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        if not self._ready:
            if self._receive(time.monotonic() + timeout) != "ready":
                self.kill()
                raise WorkerError("worker did not start")
            self._ready = True

    def send(self, request) -> None:
        payload = pickle.dumps(request)
        try:
            self.process.stdin.write(struct.pack("<Q", len(payload)) + payload)
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as error:
            self.kill()
            raise WorkerError("worker died") from error

    def _receive(self, deadline: float):
        """Reads one reply, killing the worker if it does not arrive before `deadline`."""
        fd = self.fileno()
        while True:
            if len(self._buffer) >= 8:
                size = struct.unpack("<Q", self._buffer[:8])[0]
                if len(self._buffer) >= 8 + size:
                    payload, self._buffer = self._buffer[8:8 + size], self._buffer[8 + size:]
                    return pickle.loads(payload)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise WorkerError("deadline passed")
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    self.kill()
                    raise WorkerError("worker died")
                self._buffer += chunk

    def receive(self, deadline: float):
        return self._receive(deadline)

    def poll_reply(self):
        """A reply if one is complete after reading what is available now, else None (no blocking)."""
        return self._receive(time.monotonic() + 1e-4) if self._has_data() else None

    def _has_data(self) -> bool:
        readable, _, _ = select.select([self.fileno()], [], [], 0)
        return bool(readable) or len(self._buffer) >= 8

    def call(self, request, timeout: float):
        """Sends `request` and returns the reply; raises WorkerError after `timeout` seconds."""
        self.wait_ready()
        self.send(request)
        return self._receive(time.monotonic() + timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass


_MAX_IDLE = 4
_idle: list[Worker] = []
_idle_lock = threading.Lock()
_owner_pid = os.getpid()


def _take() -> Worker:
    global _owner_pid
    with _idle_lock:
        if _owner_pid != os.getpid():
            # After a fork the parent's pipes are not ours to use.
            _idle.clear()
            _owner_pid = os.getpid()
        while _idle:
            worker = _idle.pop()
            if worker.alive():
                return worker
    return Worker()


def _give(worker: Worker) -> None:
    with _idle_lock:
        if worker.alive() and len(_idle) < _MAX_IDLE and _owner_pid == os.getpid():
            _idle.append(worker)
            return
    worker.kill()


def call_bounded(request, timeout: float, default=False):
    """Runs `request` in an idle worker (starting one if needed) within `timeout` seconds.

    Safe from any thread: each caller holds its own worker for the duration of the call.
    Returns the worker's reply, or `default` when it timed out or died (the worker is replaced).
    """
    worker = _take()
    try:
        worker.wait_ready()
        reply = worker.call(request, timeout)
    except WorkerError:
        return default
    _give(worker)
    return reply


def warmup(count: int = 1) -> None:
    """Starts `count` idle workers now, so the first symbolic grading does not pay the startup."""
    workers = [_take() for _ in range(count)]
    for worker in workers:
        worker.wait_ready()
    for worker in workers:
        _give(worker)


def shutdown() -> None:
    """Kills the idle workers (they also exit on their own when this process closes their stdin)."""
    with _idle_lock:
        workers, _idle[:] = list(_idle), []
    for worker in workers:
        worker.kill()


def run_batch(requests: list, workers: int, timeout: float, default=False) -> list:
    """Runs `requests` on `workers` processes, each within `timeout` seconds; keeps the order.

    A request whose worker dies or runs past the deadline gets `default`, and the worker is
    replaced, so one bad input costs one answer, not the batch.
    """
    results = [default] * len(requests)
    pending = list(range(len(requests)))[::-1]
    pool = [Worker() for _ in range(min(workers, len(requests)))]
    busy: dict[int, tuple[Worker, int, float]] = {}
    try:
        for worker in pool:
            worker.wait_ready()
        free = list(pool)
        while pending or busy:
            while pending and free:
                worker = free.pop()
                index = pending.pop()
                try:
                    worker.send(requests[index])
                    busy[worker.fileno()] = (worker, index, time.monotonic() + timeout)
                except WorkerError:
                    replacement = Worker()
                    replacement.wait_ready()
                    free.append(replacement)
            if not busy:
                continue
            nearest = min(deadline for _, _, deadline in busy.values())
            readable, _, _ = select.select(list(busy), [], [], max(0.0, nearest - time.monotonic()))
            now = time.monotonic()
            for fd in list(busy):
                worker, index, deadline = busy[fd]
                if fd not in readable and now < deadline:
                    continue
                try:
                    reply = worker.receive(deadline if fd in readable else now)
                    results[index] = reply
                    del busy[fd]
                    free.append(worker)
                except WorkerError:
                    del busy[fd]
                    replacement = Worker()
                    replacement.wait_ready()
                    free.append(replacement)
        return results
    finally:
        for worker in pool + [w for w, _, _ in busy.values()]:
            worker.kill()
        for worker in locals().get("free", []):
            worker.kill()
