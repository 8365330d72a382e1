"""Runs inside vLLM's worker, not in the trainer: methods vLLM mixes into its worker class
(`worker_extension_cls="jaxmath.rollout.vllm.worker.WorkerExtension"`), called by name through
`collective_rpc`. The worker is in the trainer's process when colocated, in the server's otherwise;
this module needs only torch and safetensors there.
"""

from __future__ import annotations


class WorkerExtension:
    """Weight reloads in place, called by the engines' weight sync (`jaxmath_reload_weights*`)."""

    def jaxmath_reload_weights(self, weights) -> None:
        """Reload weights in place from an iterable of (HF name, tensor); in-process callers pass a
        generator, so tensors stream in layer by layer. vLLM's `reload_weights` restores the loaders
        its post-load processing removed (a plain `model.load_weights` fails on the second load), fuses
        q/k/v and gate/up, casts, and re-runs the processing."""
        head = []
        self.model_runner.reload_weights(weights_iterator=self._jaxmath_take_head(weights, head))
        self._jaxmath_retie(head[0] if head else None)

    def jaxmath_reload_weights_file(self, path: str) -> None:
        from safetensors.torch import load_file

        head = []
        self.model_runner.reload_weights(weights_iterator=self._jaxmath_take_head(load_file(path).items(), head))
        self._jaxmath_retie(head[0] if head else None)

    def _jaxmath_tied(self) -> bool:
        return bool(getattr(self.model_runner.model_config.hf_config, "tie_word_embeddings", False))

    def _jaxmath_take_head(self, weights, head: list):
        """The weights, less an "lm_head.weight" sent for a tied model (an LM head with a LoRA adapter
        merged in, lora.train_unembed), which goes into `head`: vLLM's loader skips it for tied models."""
        tied = self._jaxmath_tied()
        for name, tensor in weights:
            if tied and name == "lm_head.weight":
                head.append(tensor)
                continue
            yield name, tensor

    def _jaxmath_retie(self, head=None) -> None:
        """vLLM's layerwise reload puts the LM head's old tensor back when no "lm_head.weight" arrives
        (tied models never send one), silently untying it from the new embedding, and on CPUs the head
        computes with a packed copy made at load time. Tie it again and redo that processing.

        head: the LM head the trainer sent for a tied model whose head carries a LoRA adapter; the head
        then gets its own tensor (untied), and the embedding keeps the one it received."""
        import torch

        model = self.model_runner.get_model()
        if not (self._jaxmath_tied() and hasattr(model, "lm_head")
                and hasattr(getattr(model, "model", None), "embed_tokens")):
            return
        embed = model.model.embed_tokens.weight
        if head is None:
            model.lm_head.weight = embed
        else:
            if tuple(head.shape) != tuple(embed.shape):
                raise ValueError(f"the LM head sent has shape {tuple(head.shape)}, vLLM's head {tuple(embed.shape)} "
                                 "(a tensor-parallel vLLM shards it): an adapted head of a tied model needs "
                                 "tensor_parallel_size 1")
            model.lm_head.weight = torch.nn.Parameter(head.to(device=embed.device, dtype=embed.dtype).clone(),
                                                      requires_grad=False)
        method = getattr(model.lm_head, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(model.lm_head)
