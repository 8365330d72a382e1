"""rl.rollout_devices: the sampler on a mesh of its own devices, the trainer on the others, the
weights moved to the sampler's mesh after each update; synchronous and overlapped, on 4 fake CPU
devices in a fresh process (XLA_FLAGS is read when jax starts)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOUR = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}

SCRIPT = textwrap.dedent("""
    import json, sys, tempfile
    import jax
    from flax import nnx
    from jaxmath.model import sharding
    from tests import overlap_helpers as helpers
    from tests.test_overlap import SlowRecordingEngine

    devices = jax.devices()
    assert len(devices) == 4, devices
    trainer = sharding.make_mesh(1, 2, 1, devices=devices[:2])
    sampler = sharding.make_mesh(1, 2, 1, devices=devices[2:])
    ids = lambda tree: sorted({d.id for x in jax.tree.leaves(tree) if isinstance(x, jax.Array) for d in x.devices()})
    out = {}
    for staleness in (0, 1):
        held = {}

        def wrap(engine):
            held["engine"] = SlowRecordingEngine(engine, delay=0.4)
            return held["engine"]

        model, ms = helpers.run(tempfile.mkdtemp(), 4, mesh=trainer, sampler_mesh=sampler, max_staleness=staleness,
                                engine_wrapper=wrap)
        out[staleness] = {"metrics": ms, "races": held["engine"].races,
                          "sampler_devices": ids(held["engine"].engine._state),
                          "trainer_devices": ids(nnx.state(model))}
    _, out["one_device"] = helpers.run(tempfile.mkdtemp(), 4)
    print("RESULT " + json.dumps(out))
""")


def _overlaps(a, b):
    return a[0] < b[1] and b[0] < a[1]


def _span(m, phase):
    return m[f"timeline/{phase}_start"], m[f"timeline/{phase}_end"]


@pytest.mark.slow  # a fresh process, three GRPO runs compiled for 4 devices
def test_the_sampler_on_devices_of_its_own_synchronous_and_overlapped():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=FOUR, cwd=ROOT,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    for staleness in ("0", "1"):
        run = out[staleness]
        assert run["sampler_devices"] == [2, 3] and run["trainer_devices"] == [0, 1]
        assert run["races"] == []
    sync, overlapped = out["0"]["metrics"], out["1"]["metrics"]
    # Synchronous, two meshes train what one device trains (the same samples, the same updates).
    for a, b in zip(out["one_device"], sync, strict=True):
        assert a["reward_mean"] == b["reward_mean"] and a["completion_len_mean"] == b["completion_len_mean"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    for m, following in zip(sync, sync[1:]):
        assert _span(m, "train")[1] <= _span(following, "rollout")[0]
    assert [m["staleness"] for m in overlapped] == [0, 1, 1, 1]
    for m, following in zip(overlapped[1:], overlapped[2:]):  # step 1 holds one-time work (see test_overlap)
        assert _overlaps(_span(following, "rollout"), _span(m, "train")), m["step"]
    assert all(m["mismatch/abs_max"] < 1e-4 for m in overlapped)
