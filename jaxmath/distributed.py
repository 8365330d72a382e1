"""Multi-host start-up: `jax.distributed.initialize` from the environment, before jax is used.

Three ways a process learns its place, checked in this order:

1. explicit: JAXMATH_COORDINATOR=host:port, JAXMATH_NUM_PROCESSES=N, JAXMATH_PROCESS_ID=i
   (optionally JAXMATH_LOCAL_DEVICE_IDS=0,1 to pin this process to some local devices);
2. SLURM: inside an `srun` step with more than one task (SLURM_NTASKS > 1), jax's own SLURM cluster
   detection reads SLURM_JOB_NODELIST, SLURM_PROCID and SLURM_LOCALID; the coordinator is the first
   node of the job (port: JAXMATH_COORDINATOR_PORT if set, else jax derives one from the job id);
3. neither: a single process, nothing to initialise.

After `initialize_from_env()` every process sees the global device list (`jax.devices()`), its own
ones in `jax.local_devices()`, and builds the same mesh. Data: each process feeds its slice of the
global batch (`jaxmath.model.sharding.shard_batch(..., process_local=True)`); checkpoints: orbax
writes every process's shards into one directory and any process count restores it.
"""

from __future__ import annotations

import dataclasses
import os
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
    """Reads the environment (default os.environ); raises ValueError on a half-set explicit plan."""
    env = os.environ if env is None else env
    explicit = {k: env.get(k) for k in ("JAXMATH_COORDINATOR", "JAXMATH_NUM_PROCESSES", "JAXMATH_PROCESS_ID")}
    if any(explicit.values()):
        missing = [k for k, v in explicit.items() if not v]
        if missing:
            raise ValueError(f"{', '.join(missing)} unset: a multi-process run needs all of JAXMATH_COORDINATOR "
                             "(host:port of process 0), JAXMATH_NUM_PROCESSES and JAXMATH_PROCESS_ID")
        num, pid = int(explicit["JAXMATH_NUM_PROCESSES"]), int(explicit["JAXMATH_PROCESS_ID"])
        if not 0 <= pid < num:
            raise ValueError(f"JAXMATH_PROCESS_ID={pid} must be in [0, JAXMATH_NUM_PROCESSES={num})")
        local = env.get("JAXMATH_LOCAL_DEVICE_IDS")
        return ProcessPlan("explicit", explicit["JAXMATH_COORDINATOR"], num, pid,
                           tuple(int(i) for i in local.split(",")) if local else None)
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in env:
        return ProcessPlan("slurm", None, int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]))
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
    logging.info("jax.distributed: process %d of %d (%s), %d local of %d devices", jax.process_index(),
                 jax.process_count(), plan.kind, jax.local_device_count(), jax.device_count())
    return plan
