"""Tests for jaxmath.metrics: JSONL content, resume truncation, NaN, TensorBoard, plots, console helpers."""

import json
import logging as py_logging
import math
import struct
import time

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from jaxmath import metrics as metrics_lib
from jaxmath.metrics import MetricsWriter, PhaseTimer, Timer, log_line, plot_metrics, progress, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tb_scalars(tb_dir) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in the TFRecord event files under tb_dir."""
    scalars = []
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.append((event.step, value.tag, value.simple_value))
    return scalars


def test_jsonl_lines_sorted_step_first_python_numbers(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(1, {"reward_mean": jnp.float32(0.25), "loss": np.float64(1.5), "num_tokens": np.int64(7)})
        # Flushed per line: readable before close, as after a kill.
        assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
        writer.write(2, {"loss": 0.5, "grad_norm": jnp.array(2.0)})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[0] == '{"step": 1, "loss": 1.5, "num_tokens": 7, "reward_mean": 0.25}'
    assert lines[1] == '{"step": 2, "grad_norm": 2.0, "loss": 0.5}'
    records = read_metrics(tmp_path)
    assert records == [json.loads(line) for line in lines]
    assert type(records[0]["num_tokens"]) is int and type(records[0]["loss"]) is float


def test_nan_and_inf_written_as_null(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write(3, {"loss": float("nan"), "grad_norm": jnp.inf, "reward_mean": 0.5})
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    assert line == '{"step": 3, "grad_norm": null, "loss": null, "reward_mean": 0.5}'
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 3, "grad_norm": None, "loss": None, "reward_mean": 0.5}]
    # Only the finite value reaches TensorBoard.
    assert _tb_scalars(tmp_path / "tb") == [(3, "reward_mean", 0.5)]


def test_bad_values_fail_clearly(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        with pytest.raises(TypeError, match="'answers' must be a scalar"):
            writer.write(1, {"answers": "x"})
        with pytest.raises(ValueError, match="step"):
            writer.write(1, {"step": 1})
    with pytest.raises(RuntimeError, match="closed"):
        writer.write(2, {"loss": 1.0})


def test_tensorboard_event_file_has_scalars(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        for step in range(3):
            writer.write(step, {"loss": 1.0 / (step + 1)})
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    scalars = _tb_scalars(tmp_path / "tb")
    assert [(s, t) for s, t, _ in scalars] == [(0, "loss"), (1, "loss"), (2, "loss")]
    assert scalars[2][2] == pytest.approx(1 / 3)


def test_resume_drops_steps_at_and_after_resume_step(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        for step in range(10):
            writer.write(step, {"loss": float(step)})
    # A run killed mid-write leaves a torn last line; resuming must survive it.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "lo')
    with MetricsWriter(tmp_path, resume_step=6) as writer:
        assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4, 5]
        for step in range(6, 8):
            writer.write(step, {"loss": 100.0 + step})
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(8))
    assert records[6]["loss"] == 106.0
    # TensorBoard gets a purge marker at the resumed step, so it hides the dead run's 6..9.
    purge_events = []
    for path in (tmp_path / "tb").glob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                purge_events.append(event.step)
    assert purge_events == [6]


def test_resume_without_file_and_append_without_resume(tmp_path):
    with MetricsWriter(tmp_path / "fresh", tensorboard=False, resume_step=4) as writer:
        writer.write(4, {"loss": 1.0})
    assert [r["step"] for r in read_metrics(tmp_path / "fresh")] == [4]
    with MetricsWriter(tmp_path / "fresh", tensorboard=False) as writer:
        writer.write(5, {"loss": 1.0})
    assert [r["step"] for r in read_metrics(tmp_path / "fresh")] == [4, 5]
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        read_metrics(tmp_path / "nowhere")


def test_plots_are_non_empty_pngs(tmp_path):
    rng = np.random.default_rng(0)
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        for step in range(60):
            metrics = {"reward_mean": 0.3 + step / 100 + 0.05 * rng.standard_normal(), "grad_norm": 1.0}
            if step % 10 == 0:
                metrics["eval_accuracy"] = 0.5 + step / 200
            if step == 7:
                metrics["grad_norm"] = float("nan")
            writer.write(step, metrics)
    written = plot_metrics(tmp_path)
    names = [p.name for p in written]
    # completion_len_mean was never logged: skipped, not an empty plot.
    assert names == ["reward_mean.png", "grad_norm.png", "eval_accuracy.png", "summary.png"]
    for path in written:
        assert path.parent == tmp_path / "plots"
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert plot_metrics(tmp_path, keys=("missing",), out_dir=tmp_path / "other") == []
    assert not (tmp_path / "other").exists()


def test_progress_quiet_without_tty_or_when_asked(monkeypatch):
    monkeypatch.delenv("JAXMATH_NO_PROGRESS", raising=False)
    monkeypatch.setattr(metrics_lib.sys.stderr, "isatty", lambda: True, raising=False)
    bar = progress(range(3), "rollout")
    assert not bar.disable
    assert list(bar) == [0, 1, 2]
    monkeypatch.setenv("JAXMATH_NO_PROGRESS", "1")
    assert progress(range(3), "rollout").disable
    monkeypatch.delenv("JAXMATH_NO_PROGRESS")
    monkeypatch.setattr(metrics_lib.sys.stderr, "isatty", lambda: False, raising=False)
    manual = progress(5, "eval")
    assert manual.disable and manual.total == 5
    manual.update(2)  # a no-op when quiet, but callable
    manual.close()


def test_log_line_format_and_absl_logging(caplog):
    caplog.set_level(py_logging.INFO)
    line = log_line(
        12,
        {"loss": 0.0312, "reward_mean": 0.44, "grad_norm": 0.8234, "completion_len_mean": 1234.6, "time/step": 3.14},
        keys=("loss", "reward_mean", "grad_norm", "completion_len_mean", "kl"),
    )
    assert line == "step 12 | loss 0.0312 | reward_mean 0.44 | grad_norm 0.823 | completion_len_mean 1235 | 3.1 s"
    assert line in caplog.text
    assert log_line(1, {"loss": None, "kl": 2e-5}, keys=("loss", "kl")) == "step 1 | loss nan | kl 2.00e-05"


def test_phase_timer_sums_per_phase():
    ticks = iter([0.0, 1.5, 2.0, 2.25, 3.0, 4.0, 10.0, 10.5])
    timer = PhaseTimer(clock=lambda: next(ticks))
    with timer.phase("rollout"):  # 1.5
        pass
    for _ in range(2):  # 0.25 + 1.0
        with timer.phase("train"):
            pass
    assert timer.pop() == {"time/rollout": 1.5, "time/train": 1.25}
    with pytest.raises(KeyError), timer.phase("sync"):  # 0.5, counted even when the phase raises
        raise KeyError("boom")
    assert timer.as_metrics() == {"time/sync": 0.5}


def test_timer_measures_real_time():
    """Wall time in seconds: at least a sleep's length (CPU time would not count it), and no more than the
    same interval measured around the block (a wrong unit or a stale start would exceed it)."""
    outer_start = time.perf_counter()
    with Timer() as timer:
        time.sleep(0.05)
    outer = time.perf_counter() - outer_start
    assert 0.05 <= timer.seconds <= outer and math.isfinite(timer.seconds)
