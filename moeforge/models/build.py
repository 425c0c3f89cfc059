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
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = sorted(k for k, v in state.items() if tuple(v.shape) != shapes[k])
    if wrong:
        shown = ", ".join(f"{k} {tuple(state[k].shape)} (expected {shapes[k]})" for k in wrong[:3])
        raise MoeforgeError(
            f"checkpoint tensors have shapes its config does not imply: {shown}{', ...' if len(wrong) > 3 else ''}; "
            "the config was edited or belongs to another model."
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


def model_from_parts(
    config: MoeforgeConfig,
    state: dict[str, torch.Tensor],
    ffn: dict[int, object],
    *,
    dtype: torch.dtype,
    unset: frozenset[str] = frozenset(),
) -> MoeforgeForCausalLM:
    """Build a model from its non-FFN tensors (by key) and each layer's FFN weights (by attribute).

    ``ffn[i]`` is a :class:`~moeforge.formats.export.MoELayerWeights` for MoE layers (router,
    gate_up, down, shared_*, router_extra) or a DenseLayerWeights (gate, up, down). The FFN
    tensors are assigned to the modules directly rather than through checkpoint keys, so a model
    built this way is an independent reference for checking an export's key table. The output
    scale comes from ``config``. Missing pieces raise :class:`MoeforgeError`, except parameters
    named in ``unset`` (e.g. the embedding and LM head of a model run on ``inputs_embeds``), which
    stay on the meta device.
    """
    from torch import nn

    with torch.device("meta"):
        model = MoeforgeForCausalLM(config)
    state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    for i, layer in enumerate(model.model.layers):
        if i not in ffn:
            raise MoeforgeError(f"internal error: no feed-forward weights for layer {i}")
        w = ffn[i]
        mlp = layer.mlp
        if layer.is_moe:
            mlp.router.load_state_dict({"weight": w.router.float(), **w.router_extra}, assign=True)
            mlp.experts.gate_up_proj = nn.Parameter(w.gate_up.to(dtype))
            mlp.experts.down_proj = nn.Parameter(w.down.to(dtype))
            if mlp.shared_experts is not None:
                mlp.shared_experts.gate_proj.weight = nn.Parameter(w.shared_gate.to(dtype))
                mlp.shared_experts.up_proj.weight = nn.Parameter(w.shared_up.to(dtype))
                mlp.shared_experts.down_proj.weight = nn.Parameter(w.shared_down.to(dtype))
        else:
            mlp.gate_proj.weight = nn.Parameter(w.gate.to(dtype))
            mlp.up_proj.weight = nn.Parameter(w.up.to(dtype))
            mlp.down_proj.weight = nn.Parameter(w.down.to(dtype))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    meta = [n for n, p in model.named_parameters() if p.is_meta and n not in unset]
    if meta:
        raise MoeforgeError(f"internal error: parameters left unset: {meta[:5]}")
    _materialize_buffers(model)
    model.requires_grad_(True)
    model.eval()
    return model
