"""The run directory: which one a run uses, and what it remembers of its run.

A workdir remembers its run in config.json: a rerun there continues it when the settings match, apart
from what resuming allows (`jaxmath.config.RESUMABLE`); other differences are refused, naming the keys;
`resume=false` moves the old run aside and starts over.
"""

from __future__ import annotations

import glob
import json
import os
import time

from absl import logging


def workdir_for(cfg, flag: str | None, config_spec: str) -> str:
    """The run directory: the --workdir flag, else config.workdir, else runs/<config file stem>[-<arg>]
    (config_spec: what --config named, path[:arg])."""
    from jaxmath.config import RunConfig, build

    run = build(RunConfig, {k: cfg[k] for k in ("mode", "workdir", "resume") if k in cfg}, prefix="config")
    if flag or run.workdir:
        return flag or run.workdir
    stem = os.path.splitext(os.path.basename(config_spec.partition(":")[0]))[0] or run.mode
    arg = config_spec.partition(":")[2]
    return os.path.join("runs", f"{stem}-{arg}" if arg else stem)


def prepare_workdir(cfg, workdir: str) -> None:
    """A workdir remembers its run in config.json. A rerun there continues it when the settings match,
    apart from what resuming allows (`jaxmath.config.RESUMABLE`); other differences are refused, naming
    the keys. `resume=false` moves the old run aside (to <workdir>.old-<time>, nothing deleted) and starts
    over. Then writes this run's config.json."""
    from jaxmath.config import ConfigError, resume_conflicts

    saved_path = os.path.join(workdir, "config.json")
    new = json.loads(cfg.to_json_best_effort())
    held = os.path.isdir(workdir) and bool(os.listdir(workdir))
    if held and not cfg.get("resume", True):
        aside = f"{os.path.normpath(workdir)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(workdir, aside)
        logging.warning("config.resume=false: starting over; the previous run in %s was moved to %s", workdir, aside)
    elif os.path.isfile(saved_path):
        try:
            with open(saved_path) as f:
                saved = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"{saved_path} is unreadable ({e}); pass --config.resume=false to move the old run "
                              "aside and start over, or another --workdir") from e
        conflicts = resume_conflicts(saved, new) if isinstance(saved, dict) else ["config.json: not a config"]
        if conflicts:
            raise ConfigError(f"{workdir} holds a run with other settings ({'; '.join(conflicts[:8])}); rerun with "
                              "those, pass --config.resume=false to start over (the old run is moved aside), or "
                              "choose another --workdir")
        logging.info("resuming the run in %s", workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(saved_path, "w") as f:
        f.write(cfg.to_json_best_effort(indent=2))


def last_checkpoint(workdir: str) -> str | None:
    """The newest finished checkpoint step directory under `workdir` (any of its runs), or None."""
    steps = [p for p in glob.glob(os.path.join(glob.escape(workdir), "**", "checkpoints", "*"), recursive=True)
             if os.path.basename(p).isdigit() and os.path.isdir(p)]
    return max(steps, key=os.path.getmtime) if steps else None
