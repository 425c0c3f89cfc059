"""Parameter counts and FLOPs per token for dense and MoE causal LMs."""

from __future__ import annotations

from torch import nn

from ..moe.layer import MoELayer


def _unique_numel(params) -> int:
    seen, total = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total and active-per-token parameter counts.

    ``total`` counts every parameter once (tied embeddings once). ``active`` replaces each MoE
    layer's parameters by those one token uses (its k routed experts, the shared experts and
    the router; see :meth:`MoELayer.num_parameters`).
    """
    total = _unique_numel(model.parameters())
    inactive = 0
    for module in model.modules():
        if isinstance(module, MoELayer):
            layer_total, layer_active = module.num_parameters()
            inactive += layer_total - layer_active
    return {"total": total, "active": total - inactive}


def flops_per_token(model: nn.Module, seq_len: int = 512) -> int:
    """Forward FLOPs per token (2 per multiply-accumulate), after Kaplan et al. (2020), sec. 2.1.

    2 x (active parameters excluding the input embedding, including the LM head) plus the
    attention score and value products, 2 x n_layers x seq_len x (heads x head_dim), averaged
    over a causal window of ``seq_len`` (each query sees (seq_len + 1) / 2 keys on average,
    counted twice: QK^T and AV).
    """
    counts = parameter_counts(model)
    embed = model.get_input_embeddings().weight.numel()
    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    )
    matmul_params = counts["active"] - embed + (embed if tied else 0)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = 2 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * (seq_len + 1) / 2
    return int(2 * matmul_params + attn)
