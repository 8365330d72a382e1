"""Ahead-of-time compilation for a target accelerator, present or not.

XLA compiles a JAX program for a GPU that is not there ("deviceless AOT"): the compiled program's
`memory_analysis()` and HLO are those of the real GPU program (cuDNN attention, GPU fusions, GPU
buffer assignment). This is how a run's programs are checked for an H100 on a CPU machine.

    jaxmath.aot.targets   the targets (h100, h200, cpu): capacity, device, sharding, kernels in an HLO
    jaxmath.aot.plan      a run's programs at the shapes its config builds, compiled one phase at a time
    jaxmath.aot.hlo       what a compiled program's HLO says: kernels, bytes moved per step, copies

Compiling for a GPU target needs the CUDA plugin (`pip install -e '.[aot]'`), nothing more: no GPU,
no CUDA driver. `python -m jaxmath.bench memory --config=... --target=h100` is the command-line face.
"""
