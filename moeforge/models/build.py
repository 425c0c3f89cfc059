"""Build a :class:`MoeforgeForCausalLM` from a complete state dict without a random init pass."""

from __future__ import annotations

import torch

from ..errors import MoeforgeError
from .configuration_moeforge import MoeforgeConfig
from .modeling_moeforge import MoeforgeForCausalLM


def model_from_state(config: MoeforgeConfig, state: dict[str, torch.Tensor], *, dtype: torch.dtype) -> MoeforgeForCausalLM:
    """Build a model from a complete moeforge state dict; missing or extra keys raise."""
    with torch.device("meta"):
        model = MoeforgeForCausalLM(config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = {k for k in model.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(expected - set(state))
    extra = sorted(set(state) - expected)
    if missing or extra:
        raise MoeforgeError(
            f"checkpoint does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}."
        )
    state = {k: (v if ".router." in k else v.to(dtype)) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    # non-persistent buffers (rotary inv_freq, router load counters) are rebuilt on a real device
    _materialize_buffers(model)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    return model


def _materialize_buffers(model: MoeforgeForCausalLM) -> None:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from ..moe.routers import SigmoidBiasRouter

    for module in model.modules():
        if isinstance(module, LlamaRotaryEmbedding):
            fresh = LlamaRotaryEmbedding(config=model.config)
            module.inv_freq = fresh.inv_freq
            module.original_inv_freq = fresh.original_inv_freq
        if isinstance(module, SigmoidBiasRouter):
            module.pending_load = torch.zeros(module.num_experts, dtype=torch.float32)
    for name, buf in model.named_buffers():
        if buf.is_meta:
            raise MoeforgeError(f"internal error: buffer {name} was not materialized")
