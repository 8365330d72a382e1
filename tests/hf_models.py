"""Random HF Qwen3 checkpoints written by transformers (torch), for reference tests.

Every weight is perturbed, norms included (HF initialises norms to ones, which would hide a norm
that is loaded into the wrong place)."""

import os

import numpy as np


def make_hf_model(out_dir: str, *, vocab_size=512, hidden_size=64, intermediate_size=96, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=32, tie=True, rope_scaling=None, seed=0,
                  max_position_embeddings=512, dtype="float32"):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                      head_dim=head_dim, tie_word_embeddings=tie, max_position_embeddings=max_position_embeddings,
                      rope_theta=10000.0, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=1, pad_token_id=0)
    if rope_scaling is not None:
        cfg.rope_parameters = {"rope_theta": 10000.0, **rope_scaling}
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype))
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    return model


def hf_logits(model, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kwargs = {} if attention_mask is None else {"attention_mask": torch.tensor(attention_mask)}
        return model(torch.tensor(ids), **kwargs).logits.float().numpy()
