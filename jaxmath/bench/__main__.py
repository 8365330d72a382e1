"""Dispatch `python -m jaxmath.bench <subcommand> ...` to `jaxmath.bench.<subcommand>.main`."""

import importlib
import json
import pkgutil
import sys

import jaxmath.bench


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(jaxmath.bench.__path__) if not m.name.startswith("_"))


def run(argv: list[str]) -> int:
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m jaxmath.bench <subcommand> [flags]\nsubcommands: {', '.join(names)}")
        return 0 if argv else 2
    name = argv[0]
    if name not in names:
        print(f"unknown benchmark {name!r}; choose one of: {', '.join(names)}", file=sys.stderr)
        return 2
    result = importlib.import_module(f"jaxmath.bench.{name}").main(argv[1:])
    sys.stdout.flush()
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
