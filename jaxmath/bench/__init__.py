"""Benchmarks: `python -m jaxmath.bench <subcommand> [flags]`.

Each subcommand is a module `jaxmath/bench/<subcommand>.py` with `main(argv: list[str]) -> dict`.
The runner prints whatever the subcommand logs, then the returned dict as one JSON object on the
last line, so scripts can read `tail -n 1`. Peer baselines are run by the subcommands themselves, in
process where the peer is installed and in a subprocess where flags name its environment and script
(`_common.run_peer`; otherwise the result says how to run it), so every ratio is measured in one run.
"""
