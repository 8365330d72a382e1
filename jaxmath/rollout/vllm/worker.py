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
        self.model_runner.reload_weights(weights_iterator=iter(weights))
        self._jaxmath_retie()

    def jaxmath_reload_weights_file(self, path: str) -> None:
        from safetensors.torch import load_file

        self.model_runner.reload_weights(weights_iterator=iter(load_file(path).items()))
        self._jaxmath_retie()

    def _jaxmath_retie(self) -> None:
        """vLLM's layerwise reload puts the LM head's old tensor back when no "lm_head.weight" arrives
        (tied models never send one), silently untying it from the new embedding, and on CPUs the head
        computes with a packed copy made at load time. Tie it again and redo that processing."""
        model = self.model_runner.get_model()
        tied = getattr(self.model_runner.model_config.hf_config, "tie_word_embeddings", False)
        if not (tied and hasattr(model, "lm_head") and hasattr(getattr(model, "model", None), "embed_tokens")):
            return
        model.lm_head.weight = model.model.embed_tokens.weight
        method = getattr(model.lm_head, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(model.lm_head)
