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


def _attention_flops(num_layers: int, heads: int, head_dim: int, seq_len: int) -> float:
    """Score and value products of causal attention per token: 2 x 2 x layers x heads x head_dim x (seq_len + 1) / 2."""
    return 2 * 2 * num_layers * heads * head_dim * (seq_len + 1) / 2


def _config_attention_flops(cfg, seq_len: int) -> float:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return _attention_flops(cfg.num_hidden_layers, cfg.num_attention_heads, head_dim, seq_len)


def _matmul_parameters(model: nn.Module, *, head: bool = True) -> int:
    """Active parameters a token multiplies: all but the input embedding (a lookup); the LM head
    counts when ``head`` (once more when it is tied to the embedding)."""
    active = parameter_counts(model)["active"]
    embed = model.get_input_embeddings().weight.numel()
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is model.get_input_embeddings().weight
    if head:
        return active - embed + (embed if tied else 0)
    return active - embed - (out.weight.numel() if out is not None and not tied else 0)


def flops_per_token(model: nn.Module, seq_len: int = 512) -> int:
    """Forward FLOPs per token (2 per multiply-accumulate), after Kaplan et al. (2020), sec. 2.1.

    2 x (active parameters excluding the input embedding, including the LM head) plus the
    attention score and value products, 2 x n_layers x seq_len x (heads x head_dim), averaged
    over a causal window of ``seq_len`` (each query sees (seq_len + 1) / 2 keys on average,
    counted twice: QK^T and AV).

    A CALM composition (:class:`~moeforge.compose.model.ComposedForCausalLM`) runs the anchor
    whole, the augmenting model's decoder only (no embedding matmul, no LM head) and each
    connection (its projections and a causal cross-attention over the augmenting positions).
    """
    from ..compose.model import ComposedForCausalLM

    if isinstance(model, ComposedForCausalLM):
        aug = model.augmenting
        total = flops_per_token(model.anchor, seq_len)
        total += 2 * _matmul_parameters(aug, head=False) + _config_attention_flops(aug.config, seq_len)
        for conn in model.connections:
            attn = conn.attn
            total += 2 * _unique_numel(conn.parameters()) + _attention_flops(1, attn.num_heads, attn.head_dim, seq_len)
        return int(total)
    return int(2 * _matmul_parameters(model) + _config_attention_flops(model.config, seq_len))
