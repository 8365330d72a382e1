"""Compile targets: the accelerator a program is compiled for, whether or not it is attached.

    target = load_target("h100")        # or "h200", "cpu"
    placement = target.sharding()       # put this on abstract arguments (jax.ShapeDtypeStruct)
    compiled = jax.jit(f).lower(*abstract_args).compile()   # an H100 program, on a CPU machine

A GPU target is described by the CUDA device description XLA's GPU compiler reads
(`targets/<name>.textproto`: memory, SMs, bandwidth, compute capability, cuDNN and CUDA versions),
handed to `jax.experimental.topologies.get_topology_desc`; this needs the CUDA plugin
(`pip install -e '.[aot]'`) and the process's CUDA start-up checks off, since no GPU answers them
(`prepare_process` sets the two environment variables before jax starts its backends). The "cpu"
target is this machine's CPU with its physical memory as capacity.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from pathlib import Path

import numpy as np

GPU_TARGETS = ("h100", "h200")
TARGETS = GPU_TARGETS + ("cpu",)
LOCAL = "local"  # the GPU this process runs on (not a --target choice: `jaxmath.aot.fit.local_target`)
# The memory each GPU is sold with, in bytes: a run is planned against the smaller of this and what
# CUDA reports (84.9e9 on an H100 80GB, 150.1e9 on an H200), which leaves the CUDA context, library
# workspaces and allocator slack outside the plan.
NOMINAL_BYTES = {"h100": 80_000_000_000, "h200": 141_000_000_000}
# Peak rates for the roofline model (`jaxmath.aot.cost`): dense tensor-core FLOP/s by operand dtype, from
# NVIDIA's H100 SXM5 datasheet (989.4 TFLOP/s bf16 and fp16, 494.7 tf32, 1,978.9 fp8; the H200 has the
# same compute); the memory bandwidth is the description's `memory_bandwidth` (`peaks`).
PEAK_FLOPS = {name: {"bf16": 989.4e12, "f16": 989.4e12, "f32": 494.7e12, "f8e4m3fn": 1978.9e12, "f8e5m2": 1978.9e12}
              for name in ("h100", "h200")}
_DIR = Path(__file__).resolve().parent / "targets"


class TargetUnavailable(RuntimeError):
    """A target that cannot be compiled for in this environment (the message says what to install)."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A compile target.

    name:           "h100", "h200", "cpu", or "local" (this process's GPU)
    platform:       the jax Device platform its programs run on ("gpu" or "cpu"); decides the
                    attention kernel (`Qwen3Config.for_platform`)
    capacity_bytes: device memory a run may fill: for a GPU the smaller of its nominal size and CUDA's
                    total (the H100 80GB: 80e9 of 84.9e9 bytes); physical RAM for the CPU
    device_bytes:   all the device's memory (CUDA's total for a GPU)
    description:    the device, in words
    """

    name: str
    platform: str
    capacity_bytes: int
    description: str
    device_bytes: int = 0

    @property
    def is_gpu(self) -> bool:
        return self.platform == "gpu"

    def device(self):
        """The jax Device programs are compiled for: a deviceless GPU, this process's own device
        ("local", `jaxmath.aot.fit.local_target`), or this process's first CPU."""
        import jax

        if self.name == LOCAL:
            return jax.devices()[0]
        if self.is_gpu:
            return _gpu_topology(self.name).devices[0]
        return jax.devices("cpu")[0]

    def sharding(self):
        """A sharding placing an array whole on the target's one device (for abstract arguments)."""
        import jax

        if self.is_gpu:
            from jax.experimental import topologies

            from jaxmath.model.sharding import MESH_AXES

            # The project's mesh axes, each of size 1, so the sharding tables resolve as on a real run.
            if self.name == LOCAL:
                mesh = jax.sharding.Mesh(np.array([self.device()]).reshape((1,) * len(MESH_AXES)), MESH_AXES)
            else:
                mesh = topologies.make_mesh(_gpu_topology(self.name), (1,) * len(MESH_AXES), MESH_AXES)
            return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        return jax.sharding.SingleDeviceSharding(self.device())


def _textproto(name: str) -> str:
    return (_DIR / f"{name}.textproto").read_text()


def _field(text: str, key: str) -> str:
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(f"{key}:"):
            return line.split(":", 1)[1].strip().strip('"')
    raise ValueError(f"target description lacks {key}")


def plugin_installed() -> bool:
    """Whether JAX's CUDA plugin (the `aot` extra) is importable."""
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins package at all
        return False


def prepare_process() -> None:
    """Let this process compile for a GPU it does not have: skip the CUDA plugin's start-up checks
    (they fail without a device) and keep the CPU as jax's platform. Call before jax starts its
    backends (first jax.devices() or computation); values the user already set are kept."""
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    if not jax.config.jax_platforms:
        jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])


def require_plugin(name: str) -> None:
    if not plugin_installed():
        raise TargetUnavailable(
            f"--target={name} compiles for an NVIDIA GPU, which needs JAX's CUDA plugin: install the "
            f"project's `aot` extra (pip install -e '.[aot]', i.e. jax[cuda12] at jax's version); "
            f"--target=cpu needs nothing")


@functools.cache
def _gpu_topology(name: str):
    require_plugin(name)
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(platform="cuda", target_config=_textproto(name), topology="1x1x1")
    except Exception as e:  # the plugin raises XlaRuntimeError / RuntimeError variants
        raise TargetUnavailable(
            f"--target={name}: JAX's CUDA plugin is installed but would not describe the GPU ({e}). "
            "Set JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 and JAX_PLATFORMS=cpu before jax starts "
            "(jaxmath.aot.targets.prepare_process does), and keep jax and jax-cuda12-plugin at one version") from e


def peaks(name: str) -> dict:
    """{"flops": {dtype: FLOP/s}, "bandwidth": bytes/s} of a GPU target, for the roofline model."""
    if name not in GPU_TARGETS:
        raise TargetUnavailable(f"the roofline model has peaks for {', '.join(GPU_TARGETS)}, not {name!r}")
    return {"flops": PEAK_FLOPS[name], "bandwidth": float(_field(_textproto(name), "memory_bandwidth"))}


def load_target(name: str) -> Target:
    """The target `name` (one of TARGETS). GPU targets read their description from targets/."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    if name == "cpu":
        try:
            ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            ram = 0
        return Target("cpu", "cpu", int(ram), "this machine's CPU (XLA CPU)", int(ram))
    text = _textproto(name)
    total = int(_field(text, "device_memory_size"))
    return Target(name, "gpu", min(total, NOMINAL_BYTES[name]), _field(text, "device_description_str"), total)
