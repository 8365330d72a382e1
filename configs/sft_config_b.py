"""SFT Config B (the study's Table 12): as Config A but lr 5e-4 for 1 epoch (119 steps).
MATH-500 76.8% in the study (baseline 79.4%).

    python -m jaxmath.main --config=configs/sft_config_b.py --config.model.path=/models/Qwen3-4B-Instruct-2507 \
        --config.data.dir=runs/distill --workdir=runs/sft_b

The sweep's shared settings are in configs/sft_sweep.py.
"""

from jaxmath.config import config_module


def get_config():
    return config_module(__file__, "sft_sweep").get_config("b")
