"""The command line: `python -m jaxmath.main --config=configs/<name>.py [--config.key=value ...] --workdir=W`.

`--help` lists the configs; `--keys` prints a config's keys with their values and meaning; `--check`
checks every setting and exits; `--debug` shows the traceback behind a one-line error.

Parses the locked config (an unknown override is an error naming the nearest key), checks every
setting before any work (`jaxmath.validate`), prepares the device (`jaxmath.aot.device`) and the workdir
(`jaxmath.workdir`), runs the mode (`jaxmath.runs`), and ends with one short line pointing at the run's
summary. Errors the user can fix (bad settings, missing or unreadable files, a full disk, permissions,
too few devices, a damaged checkpoint, a rejecting teacher endpoint) end in one line and exit code 2;
Ctrl-C says where the last checkpoint is and exits 130; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import errno
import glob
import json
import logging as pylogging
import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file from configs/, e.g. configs/demo.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory for checkpoints, metrics and results "
                                                "(default: config.workdir, else runs/<config file name>).")
_KEYS = flags.DEFINE_bool("keys", False, "Print the config's keys with their values and meaning, then exit.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback behind a one-line error.")
# jaxmath.convert.jax_to_hf has the same flag; a process that imports both (the launch tests) shares it.
_ALLOW_UNVERIFIED = (flags.FLAGS["allow_unverified"] if "allow_unverified" in flags.FLAGS else
                     flags.DEFINE_bool("allow_unverified", False, "Restore checkpoints and weights that carry no "
                                       "digests (written by an older jaxmath) instead of refusing them."))
_CHECK = flags.DEFINE_bool("check", False, "Check every setting, as a run does before any work, then exit.")

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
_config_spec = ""  # what --config named (path[:arg]), recorded by the flags parser


def one_line(message: str) -> str:
    return "error: " + " ".join(str(message).split())


def _fail(message: str, debug: bool) -> None:
    """Ends the run with one line on stderr (the traceback first under --debug) and exit code 2; in a
    job of many processes the others end too, each printing the same line (`jaxmath.distributed`)."""
    if debug:
        traceback.print_exc()
    print(one_line(message) + ("" if debug else "  (--debug shows the traceback)"), file=sys.stderr, flush=True)
    _end_job(one_line(message), EXIT_USER_ERROR)
    sys.exit(EXIT_USER_ERROR)


def _end_job(line: str, code: int) -> None:
    """In a job of many processes: tell the others and exit now (see `jaxmath.distributed.end_job`)."""
    if "jaxmath.distributed" in sys.modules:
        sys.modules["jaxmath.distributed"].end_job(line, code)


def _config_files() -> list[tuple[str, str]]:
    """(path, first line of its docstring) of each config in configs/ that defines get_config."""
    import ast

    out = []
    for path in sorted(glob.glob(os.path.join(CONFIGS_DIR, "*.py"))):
        with open(path) as f:
            tree = ast.parse(f.read())
        if any(isinstance(node, ast.FunctionDef) and node.name == "get_config" for node in tree.body):
            paragraph = " ".join((ast.get_docstring(tree) or "").strip().split("\n\n")[0].split())
            sentence = paragraph.split(". ")[0].rstrip(".")
            if len(sentence) > 100:
                sentence = sentence[:100].rsplit(" ", 1)[0] + " ..."
            out.append((os.path.relpath(path), sentence))
    return out


def usage() -> str:
    rows = "\n".join(f"  {path:<28} {purpose}" for path, purpose in _config_files())
    return f"""usage: python -m jaxmath.main --config=CONFIG [--config.KEY=VALUE ...] [--workdir=DIR] [--keys] [--check] [--allow_unverified] [--debug]

Post-training Qwen3 on math with JAX: GRPO, SFT, evaluation, distillation and the demo.

configs:
{rows}

  --config.KEY=VALUE  override a setting, e.g. --config.steps=3 --config.eval.limit=50
  --keys              print the config's keys with their values and meaning, then exit:
                        python -m jaxmath.main --config=configs/demo.py --keys
  --check             check every setting, as a run does before any work, then exit
  --workdir=DIR       the run directory (default: config.workdir, else runs/<config file name>);
                      rerunning a command resumes there, --config.resume=false starts over
  --allow_unverified  restore checkpoints that carry no digests (an older jaxmath's) instead of refusing them
  --debug             show the traceback behind a one-line error
  --helpfull          every absl flag
"""


def _override_keys(argv: list[str]) -> list[str]:
    keys = []
    for arg in argv:
        if arg.startswith("--config.") or arg.startswith("--noconfig."):
            keys.append(arg.split("=", 1)[0].split(".", 1)[1])
    return keys


def _config_arg(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return ""


def _parse(argv: list[str], flag_values: flags.FlagValues) -> list[str]:
    """absl's flag parsing into `flag_values`, raising app.UsageError for a missing config file, a config
    file that fails to load, an unknown key (naming the nearest one) or a value of the wrong type."""
    spec = _config_arg(argv)
    path = spec.partition(":")[0]
    if spec and not os.path.isfile(path):
        from jaxmath.config import nearest_key

        near = nearest_key(path, [p for p, _ in _config_files()])
        hint = f"did you mean {near}? " if near else ""
        raise app.UsageError(f"config file {path} not found; {hint}`python -m jaxmath.main --help` lists the configs")
    try:
        return flag_values(argv)
    except Exception as e:  # absl names the flag; the config's own error and an unknown key are said here
        if spec:
            from jaxmath.config import flat_items, load_config, nearest_key

            try:
                keys = list(flat_items(load_config(spec)))
            except Exception as load_error:  # the user's config file: its own error, in one line
                raise app.UsageError(f"config file {spec} failed to load: {type(load_error).__name__}: "
                                     f"{load_error}") from load_error
            for key in _override_keys(argv):
                if key not in keys:
                    near = nearest_key(key, keys)
                    hint = f"; did you mean --config.{near}?" if near else ""
                    raise app.UsageError(f"unknown config key {key!r} in {spec}{hint} (`--keys` lists them)") from e
        raise app.UsageError(str(e).splitlines()[0] if str(e) else repr(e)) from e


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a person's help, and one line (exit 2) for a missing config file, an
    unknown key (naming the nearest one) or a value of the wrong type."""
    global _config_spec
    if any(arg in ("--help", "-h", "-?", "--helpshort") for arg in argv[1:]):
        print(usage())
        sys.exit(0)
    try:
        rest = _parse(argv, flags.FLAGS)
    except app.UsageError as e:
        _fail(str(e), "--debug" in argv)
    _config_spec = _config_arg(argv)
    return rest


def settings_error(argv: list[str]) -> str | None:
    """The one line `python -m jaxmath.main ARGV --check` ends with, or None when every setting passes:
    the same parsing and checks as a run makes before any work, in this process (nothing runs).
    An exception that is not the user's (a bug) propagates."""
    from ml_collections import config_flags as cf

    flag_values = flags.FlagValues()
    cf.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True, sys_argv=list(argv))
    from jaxmath.validate import check

    try:
        _parse(list(argv), flag_values)
        check(flag_values.config)
    except _user_errors() as e:
        return one_line(error_message(e))
    return None


def _interrupted(workdir: str | None) -> None:
    from jaxmath.workdir import last_checkpoint

    last = last_checkpoint(workdir) if workdir else None
    where = (f"the last checkpoint is {last}" if last else
             f"no checkpoint was saved yet{' in ' + workdir if workdir else ''}")
    print(f"interrupted: {where}; run the same command to resume", file=sys.stderr, flush=True)
    _end_job(f"interrupted: {where}; run the same command to resume", EXIT_INTERRUPTED)
    sys.exit(EXIT_INTERRUPTED)


def _user_errors() -> tuple[type, ...]:
    """Exceptions caused by the user's input or the machine: reported in one line."""
    from jaxmath.checkpoint import CheckpointError
    from jaxmath.config import ConfigError
    from jaxmath.data.datasets import DataError
    from jaxmath.distill import DistillError

    return (ConfigError, CheckpointError, DistillError, DataError, OSError, UnicodeDecodeError, json.JSONDecodeError,
            app.UsageError)


_OS_HINTS = {
    errno.ENOSPC: "free space there and rerun the same command (it resumes from the last checkpoint)",
    errno.EDQUOT: "free space there and rerun the same command (it resumes from the last checkpoint)",
    errno.EACCES: "make it readable/writable or choose another --workdir",
    errno.EPERM: "make it readable/writable or choose another --workdir",
    errno.EROFS: "the filesystem is read-only: choose another --workdir",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a directory was expected: check the path",
    errno.EISDIR: "a file was expected: check the path",
}


def error_message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno in _OS_HINTS:
        return f"{e}; {_OS_HINTS[e.errno]}"
    return str(e) or type(e).__name__


class _QuietLibraries(pylogging.Filter):
    """Keeps orbax's per-save INFO chatter and jax's backend probing ("Unable to initialize backend
    'tpu'") out of the run log; their warnings and errors still show."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        if record.levelno >= pylogging.WARNING:
            return True
        return "/orbax/" not in record.pathname and not record.name.startswith("jax._src.xla_bridge")


class _AboveTheBar:
    """The log's stream: each line written above a progress bar (tqdm.write), never through it."""

    def write(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stderr, end="")

    def flush(self) -> None:
        sys.stderr.flush()

    def close(self) -> None:  # stderr stays open
        pass


def main(argv: list[str]) -> None:
    try:
        _main(argv)
    except Exception as e:  # a bug; in a job of many processes the others end too
        distributed = sys.modules.get("jaxmath.distributed")
        if distributed is None or not distributed.joined():
            raise
        # A collective fails at once when a peer has gone: that peer's own error, or the watchdog's
        # line about it, is the one to show (the watchdog ends this process when it has either).
        distributed.wait_for_peer_failure()
        traceback.print_exc()
        first = (str(e).splitlines() or [""])[0]
        _end_job(one_line(f"{type(e).__name__}: {first}"), 1)
        raise


def _main(argv: list[str]) -> None:
    debug = _DEBUG.value
    workdir = None
    try:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}; pass settings as --config.key=value")
        cfg = _CONFIG.value
        if cfg is None:
            raise app.UsageError("--config is required, e.g. --config=configs/demo.py (--help lists the configs)")
        if _KEYS.value:
            _print_keys(cfg)
            return
        from jaxmath.validate import check

        check(cfg)
        if _CHECK.value:
            print(f"{_config_spec}: every setting passes")
            return
        mode = cfg.mode
        if _ALLOW_UNVERIFIED.value:
            from jaxmath import checkpoint

            checkpoint.accept_unverified()
        from jaxmath.aot.device import prepare_device

        # JAX's allocator from the run's device plan, before any jax device is touched.
        prepare_device(cfg)
        # A multi-host job joins here, before any jax device is touched (one process: a no-op).
        from jaxmath import distributed

        if distributed.plan_from_env().process_id != 0:  # process 0 logs the run; the others only warnings
            logging.set_verbosity(logging.WARNING)        # and errors
        distributed.initialize_from_env()
        from jaxmath.runs import MODES, engines_line
        from jaxmath.workdir import prepare_workdir, workdir_for

        workdir = workdir_for(cfg, _WORKDIR.value, _config_spec)
        if distributed.is_writer():  # the others find it prepared (or end with process 0's error)
            prepare_workdir(cfg, workdir)
        distributed.barrier("jaxmath_workdir")
        logging.info("jaxmath %s: workdir %s", mode, workdir)
        logging.info("%s", engines_line(cfg))
        result = MODES[mode](cfg, workdir)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        _interrupted(workdir)
    except SystemExit as e:  # a message the code raised for the user (an exit code passes through)
        if isinstance(e.code, str):
            _fail(e.code, debug)
        raise
    except _user_errors() as e:
        _fail(error_message(e), debug)
    if isinstance(result, dict):
        logging.info("%s", finish(cfg, workdir, result))


SUMMARY_FILE = "run_summary.json"


def finish(cfg, workdir: str, result: dict) -> str:
    """Writes the run's whole summary to <workdir>/run_summary.json and returns the run's short last line:
    its headline figure, whether it was a smoke run, and where the rest is."""
    from jaxmath.distributed import is_writer

    path = os.path.join(workdir, SUMMARY_FILE)
    if is_writer():
        with open(path, "w") as f:
            json.dump({k: v for k, v in result.items() if k != "meta"}, f, indent=2, default=str)
    smoke = smoke_reason(cfg, result)
    note = f"; a smoke run ({smoke}): its figures are not results" if smoke else ""
    return f"done: {_headline(result)}{note}; every figure in {path}"


def smoke_reason(cfg, result: dict) -> str:
    """Why a run's figures are not results (too few steps, random weights, a few problems), or ""."""
    if cfg.mode == "demo":
        return result.get("smoke", "")
    if cfg.mode in ("grpo", "sft", "eval") and cfg.model.get("preset") and not cfg.model.get("path"):
        return f"a randomly initialised {cfg.model.preset} model"
    if cfg.mode == "eval" and cfg.eval.limit:
        return f"the first {cfg.eval.limit} problems of each benchmark"
    return ""


def _headline(result: dict) -> str:
    """A few of the run's figures, short: the demo's gain, each benchmark's accuracy, or its first numbers."""
    if "format_blind_gain" in result:
        return f"SFT then GRPO minus SFT only: {100 * result['format_blind_gain']:+.1f} points format-blind"
    accuracies = [f"{k} {100 * v['accuracy']:.1f}%" for k, v in result.items()
                  if isinstance(v, dict) and isinstance(v.get("accuracy"), (int, float))]
    numbers = [f"{k}={v:.4g}" for k, v in result.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)]
    parts, line = accuracies or numbers, ""
    for part in parts:
        if len(line) + len(part) > 100:
            break
        line = f"{line}, {part}" if line else part
    return line or "finished"


def _print_keys(cfg) -> None:
    from jaxmath.config import describe_keys

    for key, value, meaning in describe_keys(cfg):
        shown = json.dumps(value) if not isinstance(value, str) else repr(value)
        print(f"{key} = {shown}" + (f"    # {meaning}" if meaning else ""))


def run() -> None:
    handler = logging.get_absl_handler()
    handler.addFilter(_QuietLibraries())
    handler.python_handler.stream = _AboveTheBar()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    sys.exit(run())
