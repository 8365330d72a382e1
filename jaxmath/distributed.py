"""Multi-host start-up: `jax.distributed.initialize` from the environment, before jax is used.

Three ways a process learns its place, checked in this order:

1. explicit: JAXMATH_COORDINATOR=host:port, JAXMATH_NUM_PROCESSES=N, JAXMATH_PROCESS_ID=i
   (optionally JAXMATH_LOCAL_DEVICE_IDS=0,1 to pin this process to some local devices);
2. SLURM: inside an `srun` step with more than one task (SLURM_NTASKS > 1 and SLURM_STEP_NODELIST
   set), jax's own SLURM cluster detection (jax/_src/clusters/slurm_cluster.py) reads SLURM_JOB_ID,
   SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID; the coordinator is the first
   node of the step (port: JAXMATH_COORDINATOR_PORT if set, else jax derives one from the job id), and
   on GPUs each process takes the one GPU of its SLURM_LOCALID. A batch script's own shell (sbatch
   without srun) has SLURM_NTASKS but no step: it runs as one process, with a warning;
3. neither: a single process, nothing to initialise.

After `initialize_from_env()` every process sees the global device list (`jax.devices()`), its own
ones in `jax.local_devices()`, and builds the same mesh. Data: each process feeds its slice of the
global batch (`jaxmath.model.sharding.shard_batch(..., process_local=True)`); checkpoints: orbax
writes every process's shards into one directory and any process count restores it.

`python -m jaxmath.main` runs every mode this way: every process runs the same host code on the same
host data (prompts, rewards, group filtering, metrics are computed identically in each, from
completions every process holds whole), so they run the same programs in the same order; only process
0 writes (`is_writer`): logs, metrics, plots, results. Where a host figure could differ between
processes (free memory, which sizes the sampler's slots) they take the least (`agree_min`).

A failed process must not leave the others waiting in a collective. `initialize_from_env` starts a
watchdog thread in each process: it publishes a heartbeat in the job's key-value store every second
and reads the others'. A process that fails publishes its one-line error before it exits
(`end_job`); every other process prints that line and exits with its code. A process that stops
without a word (killed, or its machine lost) is noticed when its heartbeat is PEER_TIMEOUT_S old, or
when process 0 (which holds the store) cannot be reached; the others then exit with one line saying so.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import sys
import threading
import time
from typing import Mapping

from absl import logging


@dataclasses.dataclass(frozen=True)
class ProcessPlan:
    """How this process joins the job. coordinator None: SLURM auto-detection by jax."""

    kind: str  # "single", "explicit" or "slurm"
    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0
    local_device_ids: tuple[int, ...] | None = None


def plan_from_env(env: Mapping[str, str] | None = None) -> ProcessPlan:
    """Reads the environment (default os.environ); raises ConfigError (a ValueError) on a half-set
    explicit plan."""
    env = os.environ if env is None else env
    explicit = {k: env.get(k) for k in ("JAXMATH_COORDINATOR", "JAXMATH_NUM_PROCESSES", "JAXMATH_PROCESS_ID")}
    if any(explicit.values()):
        from jaxmath.config import ConfigError

        missing = [k for k, v in explicit.items() if not v]
        if missing:
            raise ConfigError(f"{', '.join(missing)} unset: a multi-process run needs all of JAXMATH_COORDINATOR "
                             "(host:port of process 0), JAXMATH_NUM_PROCESSES and JAXMATH_PROCESS_ID")
        num, pid = int(explicit["JAXMATH_NUM_PROCESSES"]), int(explicit["JAXMATH_PROCESS_ID"])
        if not 0 <= pid < num:
            raise ConfigError(f"JAXMATH_PROCESS_ID={pid} must be in [0, JAXMATH_NUM_PROCESSES={num})")
        local = env.get("JAXMATH_LOCAL_DEVICE_IDS")
        return ProcessPlan("explicit", explicit["JAXMATH_COORDINATOR"], num, pid,
                           tuple(int(i) for i in local.split(",")) if local else None)
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in env:
        if "SLURM_STEP_NODELIST" in env:
            return ProcessPlan("slurm", None, int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]))
        logging.warning("SLURM_NTASKS=%s but no srun step (SLURM_STEP_NODELIST unset): running as one process; "
                        "start the command under srun (launch/slurm.sbatch) to run one process per task",
                        env["SLURM_NTASKS"])
    return ProcessPlan("single")


def initialize_from_env(env: Mapping[str, str] | None = None) -> ProcessPlan:
    """Calls `jax.distributed.initialize` as the environment says (see the module docstring).
    Must run before anything touches jax devices; calling it again is a no-op."""
    plan = plan_from_env(env)
    if plan.kind == "single":
        return plan
    import jax

    if jax.distributed.is_initialized():
        return plan
    if plan.kind == "explicit":
        jax.distributed.initialize(coordinator_address=plan.coordinator, num_processes=plan.num_processes,
                                   process_id=plan.process_id, local_device_ids=plan.local_device_ids)
    else:
        # jax's SlurmCluster derives the coordinator (first host of the nodelist), the process count
        # and id, and the local device ids from the srun environment.
        env = os.environ if env is None else env
        if env.get("JAXMATH_COORDINATOR_PORT"):
            os.environ.setdefault("JAX_COORDINATOR_PORT", env["JAXMATH_COORDINATOR_PORT"])
        jax.distributed.initialize()
    _Watchdog.start()
    logging.info("jax.distributed: process %d of %d (%s), %d local of %d devices", jax.process_index(),
                 jax.process_count(), plan.kind, jax.local_device_count(), jax.device_count())
    return plan


# --- one job, many processes ------------------------------------------------------------------------

PEER_TIMEOUT_S = 20.0  # a peer whose heartbeat is this old has stopped (jax's own timeout is 100 s)
HEARTBEAT_S = 1.0
_ERRORS = "jaxmath/error/"  # process id -> its one-line error
_ALIVE = "jaxmath/alive/"  # process id -> a counter it raises every HEARTBEAT_S
_DONE = "jaxmath/done/"  # process id -> present once it has ended well


def joined() -> bool:
    """Whether this process is one of a job of several (joined by `initialize_from_env`)."""
    return _Watchdog._thread is not None


def is_writer() -> bool:
    """Whether this process writes the run's files (logs, metrics, plots, results): process 0 only."""
    import jax

    return jax.process_index() == 0


def agree_min(value: int) -> int:
    """The least of every process's `value` (one process: `value`). Every process must call it
    together, as they run the same program: a figure that sizes a program (free memory) must agree."""
    import jax

    if jax.process_count() == 1:
        return value
    # Through the job's key-value store, not a device collective (which would narrow int64 to int32).
    global _agreements
    _agreements += 1
    client, key, me = _client(), f"jaxmath/agree/{_agreements}/", jax.process_index()
    client.key_value_set(f"{key}{me}", str(int(value)))
    agreed = min(int(client.blocking_key_value_get(f"{key}{p}", 10 * 60 * 1000)) for p in range(jax.process_count()))
    if _agreements > 2:  # every process wrote this one, so each has read the earlier ones: drop one of ours
        client.key_value_delete(f"jaxmath/agree/{_agreements - 2}/{me}")
    return agreed


_agreements = 0  # agree_min calls so far: every process makes the same ones, in the same order


def to_host(tree):
    """`jax.device_get(tree)`, with each array's whole value in every process: the shards of an array
    spread over the processes are gathered from them (every process must call it together)."""
    import jax

    def get(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return jax.device_get(x)
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(x, tiled=True)

    return jax.tree.map(get, tree)


def barrier(name: str) -> None:
    """Every process waits here for the others (one process: nothing)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _client():
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


def _exit_now(code: int) -> None:
    """Leaves without jax's shutdown barrier (which would wait for peers that are gone or stuck)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _Watchdog:
    """The thread that ends this process when another one fails (see the module docstring)."""

    _thread: threading.Thread | None = None
    ending = threading.Event()  # set once this process ends: on its own error, or well (at exit)

    @classmethod
    def start(cls) -> None:
        import jax

        if cls._thread is None and jax.process_count() > 1:
            cls._thread = threading.Thread(target=cls._run, args=(jax.process_index(), jax.process_count()),
                                           name="jaxmath-watchdog", daemon=True)
            cls._thread.start()
            # Runs before jax's own exit handler (registered at import, so called later): a process
            # that ends well says so, and the others stop watching its heartbeat.
            atexit.register(cls._finished, jax.process_index())

    @classmethod
    def _finished(cls, me: int) -> None:
        cls.ending.set()
        # The thread stops before jax's shutdown: a call into a client being torn down aborts the process.
        cls._thread.join(timeout=10 * HEARTBEAT_S)
        try:
            _client().key_value_set(f"{_DONE}{me}", "1", allow_overwrite=True)
        except Exception:
            pass

    @classmethod
    def _run(cls, me: int, count: int) -> None:
        client = _client()
        beats, last_change, last_seen = 0, {}, {}
        while not cls.ending.is_set():
            now = time.monotonic()
            try:
                beats += 1
                client.key_value_set(f"{_ALIVE}{me}", str(beats), allow_overwrite=True)
                errors = dict(client.key_value_dir_get(_ERRORS))
                alive = dict(client.key_value_dir_get(_ALIVE))
                done = {int(k.rsplit("/", 1)[1]) for k, _ in client.key_value_dir_get(_DONE)}
            except Exception as e:  # the store lives in process 0
                if cls.ending.is_set():
                    return
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                print(f"error: lost process 0 of {count}, which coordinates the job (killed, or its machine "
                      f"failed; {first[:200]}); ending process {me} too", file=sys.stderr, flush=True)
                _exit_now(2)
            if cls.ending.is_set():
                return
            for key, line in errors.items():
                peer = int(key.rsplit("/", 1)[1])
                if peer != me:
                    client.key_value_set(f"jaxmath/seen/{me}", "1", allow_overwrite=True)
                    code, _, message = line.partition(" ")
                    print(f"{message} (in process {peer} of {count}; ending process {me} too)", file=sys.stderr,
                          flush=True)
                    _exit_now(int(code))
            for key, beat in alive.items():
                peer = int(key.rsplit("/", 1)[1])
                if last_seen.get(peer) != beat:
                    last_seen[peer], last_change[peer] = beat, now
            for peer in range(count):
                if peer != me and peer not in done and now - last_change.setdefault(peer, now) > PEER_TIMEOUT_S:
                    print(f"error: process {peer} of {count} stopped without a word for {PEER_TIMEOUT_S:.0f} s "
                          f"(killed, or its machine failed); ending process {me} too", file=sys.stderr, flush=True)
                    _exit_now(2)
            cls.ending.wait(HEARTBEAT_S)


def wait_for_peer_failure() -> None:
    """Gives the watchdog time (PEER_TIMEOUT_S and a little) to end this process on another process's
    error or silence; returns when it has not (the failure is this process's own). One process: returns."""
    if _Watchdog._thread is None or not _Watchdog._thread.is_alive():
        return
    deadline = time.monotonic() + PEER_TIMEOUT_S + 3 * HEARTBEAT_S
    while time.monotonic() < deadline and _Watchdog._thread.is_alive():
        time.sleep(0.2)


def end_job(line: str, code: int) -> None:
    """In a job of many processes: publish this process's one-line error (already printed) for the
    others, and exit now with `code`. Process 0, which holds the store, first waits (up to
    PEER_TIMEOUT_S) until every other process has read it or failed itself. One process: returns."""
    import jax

    if jax.process_count() == 1 or not jax.distributed.is_initialized():
        return
    _Watchdog.ending.set()
    client, me, count = _client(), jax.process_index(), jax.process_count()
    try:
        client.key_value_set(f"{_ERRORS}{me}", f"{code} {line}", allow_overwrite=True)
        if me == 0:
            deadline = time.monotonic() + PEER_TIMEOUT_S
            while time.monotonic() < deadline:
                done = {int(k.rsplit("/", 1)[1]) for k, _ in client.key_value_dir_get("jaxmath/seen/")}
                done |= {int(k.rsplit("/", 1)[1]) for k, _ in client.key_value_dir_get(_ERRORS)}
                if done >= set(range(1, count)):
                    break
                time.sleep(0.2)
    except Exception:  # the store is gone (process 0 ended): nothing more to tell
        pass
    _exit_now(code)
