"""`python -m jaxmath.bench sft_step`: jaxmath's SFT update against HF transformers' on one model
directory and token batch, the two sides doing the same work (both recompute each layer, or neither)."""

import pytest

from jaxmath.bench import sft_step
from tests.hf_models import make_hf_model


@pytest.mark.parametrize("remat", ["full", pytest.param("none", marks=pytest.mark.slow)])
def test_both_sides_train_the_same_model_with_the_same_recomputation(tmp_path, remat):
    make_hf_model(str(tmp_path), vocab_size=256, seed=9)
    out = sft_step.main([f"--model={tmp_path}", "--batch=2", "--seq=32", "--steps=1", "--rounds=1",
                         f"--remat={remat}", "--chunk_size=16"])
    assert out["remat"] == remat and out["hf_gradient_checkpointing"] == (remat == "full")
    # the warm-up update's loss: the same model, batch and loss on both sides
    assert out["loss"] == pytest.approx(out["hf_loss"], rel=1e-4)
    assert out["tokens_per_s"] > 0 and out["hf_tokens_per_s"] > 0
