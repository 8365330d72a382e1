"""The entry point: `python -m jaxmath.main --config=configs/<name>.py [--config.key=value ...] --workdir=W`.

`--help` lists the configs and the flags. The command line and its errors are `jaxmath.cli`; the
checks before any work `jaxmath.validate`; the workdir's memory `jaxmath.workdir`; the device plan and
fitting `jaxmath.aot.device`; the runs of each mode `jaxmath.runs`, built from the typed sections of
`jaxmath.sections`.
"""

import sys

from jaxmath.cli import run

if __name__ == "__main__":
    sys.exit(run())
