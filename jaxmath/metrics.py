"""What a person watching a run sees: a metrics JSONL file, TensorBoard scalars, plots, log lines.

`MetricsWriter` appends one JSON object per step to `<workdir>/metrics.jsonl` (the file the
plots, reports and tests read) and mirrors the scalars to TensorBoard under `<workdir>/tb/`.
On resume it truncates both to the resumed step, so a restarted run leaves no duplicate steps.
`progress`, `log_line` and `PhaseTimer` are the console side: quiet in CI, one short line per step.

Boundary: no JAX here beyond `jax.process_index` (only process 0 writes); callers pass
host scalars or 0-d arrays and decide what to log.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"
DEFAULT_PLOT_KEYS = ("reward_mean", "completion_len_mean", "grad_norm", "eval_accuracy")


def _to_json_number(key: str, value: Any) -> int | float | None:
    """A host Python number for JSON: ints stay ints, NaN and inf become None (JSON has neither)."""
    if isinstance(value, bool | np.bool_):
        return int(value)
    if isinstance(value, int | np.integer):
        return int(value)
    try:
        number = float(np.asarray(value).item())
    except (TypeError, ValueError) as e:
        raise TypeError(f"metric {key!r} must be a scalar number, got {type(value).__name__}: {value!r}") from e
    return number if math.isfinite(number) else None


def _read_jsonl(path: Path) -> list[dict]:
    """Parses a metrics file, skipping a torn last line from a run killed mid-write."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logging.warning("%s:%d is not valid JSON (torn write?); skipping it", path, line_number)
    return records


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics file (or of `<workdir>/metrics.jsonl`), in file order.

    NaN and inf were written as null and come back as None.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}; is this the workdir of a jaxmath run?")
    return _read_jsonl(path)


class MetricsWriter:
    """Appends per-step scalars to `<workdir>/metrics.jsonl` and TensorBoard (`<workdir>/tb/`).

    resume_step: when resuming from a checkpoint at this step, records with step >= resume_step
      (written after that checkpoint by the run that died) are dropped from the JSONL file and
      hidden in TensorBoard, so the resumed run's records are the only ones for those steps.
    Only process 0 writes; on other processes every method is a no-op.
    """

    def __init__(self, workdir: str | Path, *, tensorboard: bool = True, resume_step: int | None = None):
        self.workdir = Path(workdir)
        self.path = self.workdir / METRICS_FILE
        self._enabled = jax.process_index() == 0
        self._file = None
        self._tb = None
        if not self._enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate(resume_step)
        # Line buffering plus an explicit flush per write: a killed run loses at most the line
        # being written, and `tail -f` shows each step as it finishes.
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step makes TensorBoard discard the dead run's events at and after that step.
            self._tb = SummaryWriter(logdir=str(self.workdir / "tb"), purge_step=resume_step)

    def _truncate(self, resume_step: int) -> None:
        kept = [r for r in _read_jsonl(self.path) if int(r.get("step", -1)) < resume_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in kept)
        # Atomic swap: a crash during resume leaves either the old file or the truncated one.
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Records `metrics` for `step`: one JSON line (keys sorted, `step` first) and TB scalars."""
        if not self._enabled:
            return
        if self._file is None:
            raise RuntimeError(f"MetricsWriter for {self.workdir} is closed")
        if "step" in metrics:
            raise ValueError("pass the step as the `step` argument, not as a metrics key")
        values = {key: _to_json_number(key, metrics[key]) for key in sorted(metrics)}
        record = {"step": int(step), **values}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                # A NaN point would be drawn as nothing anyway; the JSONL keeps the null.
                if value is not None:
                    self._tb.add_scalar(key, value, global_step=int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None and "step" in r]
    if not points:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*points)
    return np.asarray(steps, float), np.asarray(values, float)


def _draw(ax, steps: np.ndarray, values: np.ndarray, key: str) -> None:
    """Raw values, plus a moving average once there are enough points that the raw line is noise."""
    window = max(1, len(values) // 20)
    ax.plot(steps, values, marker="." if len(values) < 50 else None, alpha=0.35 if window > 1 else 1.0, label=key)
    if window > 1:
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, label=f"{key} (mean of {window})")
        ax.legend(loc="best", fontsize="small")
    ax.set_title(key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)


def plot_metrics(
    workdir: str | Path,
    keys: Sequence[str] = DEFAULT_PLOT_KEYS,
    out_dir: str | Path | None = None,
) -> list[Path]:
    """Writes `<key>.png` for each key present in the metrics file, and a combined `summary.png`.

    Keys with no finite value are skipped. Returns the written paths (summary last). Defaults to
    `<workdir>/plots/`.
    """
    if jax.process_index() != 0:  # only process 0 writes
        return []
    # Figure + Agg canvas directly: no pyplot global state, no display needed, safe in threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    workdir = Path(workdir)
    out_dir = Path(out_dir) if out_dir is not None else workdir / "plots"
    records = read_metrics(workdir)
    series = {key: _series(records, key) for key in keys}
    series = {key: s for key, s in series.items() if len(s[0])}
    if not series:
        logging.warning("none of %s in %s; no plots written", list(keys), workdir / METRICS_FILE)
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, (steps, values) in series.items():
        fig = Figure(figsize=(6, 4), dpi=100)
        FigureCanvasAgg(fig)
        _draw(fig.add_subplot(), steps, values, key)
        fig.tight_layout()
        path = out_dir / f"{key.replace('/', '_')}.png"
        fig.savefig(path)
        written.append(path)
    columns = min(2, len(series))
    rows = math.ceil(len(series) / columns)
    fig = Figure(figsize=(6 * columns, 3.5 * rows), dpi=100)
    FigureCanvasAgg(fig)
    for index, (key, (steps, values)) in enumerate(series.items()):
        _draw(fig.add_subplot(rows, columns, index + 1), steps, values, key)
    fig.suptitle(str(workdir))
    fig.tight_layout()
    summary = out_dir / "summary.png"
    fig.savefig(summary)
    written.append(summary)
    return written


def series_figure(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    ylim: tuple[float, float] | None = None,
    vline: tuple[float, str] | None = None,
):
    """A matplotlib Figure of named (x, y) lines on one pair of labelled axes, e.g. several runs'
    accuracy over steps.

    ylim: fixed y-axis limits (a 0-100% axis keeps a small change from looking large); vline: an
    (x, label) marker, such as the step where a second phase starts. Lines whose names share the part
    before ", " ("SFT only, boxed", "SFT only, format-blind") share a colour, the later ones dashed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours: dict[str, str] = {}
    for name, (x, y) in series.items():
        group = name.split(", ")[0]
        seen = group in colours
        colours.setdefault(group, f"C{len(colours)}")
        ax.plot(x, y, color=colours[group], linestyle="--" if seen else "-", marker="." if len(x) < 50 else None,
                label=name)
    if vline is not None:
        ax.axvline(vline[0], color="grey", linestyle=":", linewidth=1)
        ax.annotate(vline[1], (vline[0], 1), xycoords=("data", "axes fraction"), xytext=(4, -12),
                    textcoords="offset points", fontsize="small", color="grey")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return fig


def plot_series(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path,
                **figure_args: Any) -> Path:
    """Writes `series_figure(series, **figure_args)` to `path` (a .png) and returns the path (process 0
    only: the others return the path unwritten)."""
    path = Path(path)
    if jax.process_index() != 0:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    series_figure(series, **figure_args).savefig(path)
    return path


def progress_enabled() -> bool:
    """Bars only for a person at a terminal: not in CI logs, not when asked off, not on process > 0."""
    if os.environ.get("JAXMATH_NO_PROGRESS", "") not in ("", "0"):
        return False
    return sys.stderr.isatty() and jax.process_index() == 0


def progress(iterable_or_total: Iterable | int, desc: str = "") -> tqdm:
    """A tqdm bar over an iterable, or a manual bar (`.update(n)`) when given a total count.

    Silent (still iterable; `.update` does nothing) when `progress_enabled()` is False.
    """
    disable = not progress_enabled()
    if isinstance(iterable_or_total, int):
        return tqdm(total=iterable_or_total, desc=desc, disable=disable, dynamic_ncols=True)
    return tqdm(iterable_or_total, desc=desc, disable=disable, dynamic_ncols=True)


def _format_number(value: Any) -> str:
    if value is None:
        return "nan"
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return str(int(value))
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if value != 0 and abs(value) >= 100:
        return f"{value:.0f}"
    if value == 0 or abs(value) >= 1e-3:
        return f"{value:.3g}"
    return f"{value:.2e}"


def log_line(
    step: int,
    metrics: Mapping[str, Any],
    keys: Sequence[str] = ("loss", "reward_mean", "grad_norm"),
    *,
    seconds_key: str = "time/step",
) -> str:
    """Logs (absl INFO) and returns one short line, e.g. `step 12 | loss 0.031 | grad_norm 0.82 | 3.1 s`.

    Keys missing from `metrics` are left out; `metrics[seconds_key]`, when present, ends the line.
    """
    parts = [f"step {int(step)}"]
    parts += [f"{key} {_format_number(metrics[key])}" for key in keys if key in metrics]
    if seconds_key in metrics and metrics[seconds_key] is not None:
        parts.append(f"{float(metrics[seconds_key]):.1f} s")
    line = " | ".join(parts)
    logging.info(line)
    return line


class Timer:
    """`with Timer() as t: ...` then `t.seconds`.

    JAX dispatches asynchronously: block on the phase's outputs (`jax.block_until_ready`) inside
    the block, or the time lands in whichever later phase first waits on them.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self.seconds = 0.0

    def __enter__(self) -> Timer:
        self._start = self._clock()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = self._clock() - self._start


class PhaseTimer:
    """Accumulates seconds per named phase of a step (rollout, logprob, train, sync).

        timer = PhaseTimer()
        with timer.phase("rollout"):
            ...
        metrics.update(timer.pop())   # {"time/rollout": 3.2, ...}, and starts the next step at zero

    A phase entered several times in a step (e.g. per micro-batch) sums. Same async caveat as `Timer`.
    """

    def __init__(self, prefix: str = "time/", clock: Callable[[], float] = time.perf_counter):
        self.prefix = prefix
        self._clock = clock
        self._seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = self._clock()
        try:
            yield
        finally:
            self._seconds[name] += self._clock() - start

    def as_metrics(self) -> dict[str, float]:
        """Seconds per phase so far, keyed `<prefix><phase>`, in first-entered order."""
        return {f"{self.prefix}{name}": seconds for name, seconds in self._seconds.items()}

    def reset(self) -> None:
        self._seconds.clear()

    def pop(self) -> dict[str, float]:
        """`as_metrics()`, then `reset()`: call once per step."""
        metrics = self.as_metrics()
        self.reset()
        return metrics
