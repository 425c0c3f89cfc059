"""Sparse upcycling (Komatsuzaki et al. 2022) and granular upcycling (He et al. 2024, arXiv 2410.07524).

* ``upcycle``: every expert is a copy of the dense FFN. Optional Gaussian noise (relative to
  each matrix's std) and Drop-Upcycling-style partial re-initialisation (Nakamura et al. 2025):
  a random fraction r of each expert's neurons gets fresh gate/up rows and down columns drawn
  from N(mean, std) of the dense matrices.
* ``granular-upcycle``: the FFN is cut into G contiguous parts of I/G neurons, the G parts are
  replicated E/G times; expert e holds part e mod G and belongs to virtual group e // G. With
  virtual-group router initialisation the G experts of one group share a router row, so a
  token that picks a group picks all its parts, i.e. the whole dense FFN (Megatron-LM's
  ``upcycling_utils``).

Output scale (``--rescale auto``), Megatron-LM's activation scale: with softmax-then-top-k and
raw (unrenormalised) probabilities the routed sum is about (k/G)(1/E) of the dense output, so
the scale is E*G/k; with renormalised top-k weights (Mixtral) each chosen group carries weight
1/(k/G) spread over G parts, so the scale is G. Megatron folds the scale into the weights (the
cube root into each GLU matrix, which is only approximate for SwiGLU because silu is not
homogeneous); moeforge applies it as the layer's output scale, which is exact, and folds it
into down_proj when exporting to stock formats. With k a multiple of G and renormalised
weights the granular model reproduces the dense model exactly.
"""

from __future__ import annotations

import torch

from .base import DenseFFN, LayerContext, LayerExperts, register_method


def activation_scale(granularity: int, weight_sum: float) -> float:
    """The upcycling activation scale G / (a token's summed routing weights): Megatron-LM's G for
    renormalised top-k, E*G/k for raw softmax weights (He et al. 2024), and likewise for the other
    routers (:attr:`~moeforge.convert.config.ConvertConfig.routed_weight_sum`)."""
    return float(granularity) / weight_sum


def _perturb(expert_gate_up: torch.Tensor, expert_down: torch.Tensor, ffn: DenseFFN, ctx: LayerContext, m: int) -> None:
    """In-place noise / partial re-initialisation of one expert (gate_up (2m, H), down (H, m))."""
    cfg, g = ctx.config, ctx.generator
    if cfg.upcycle_noise > 0:
        for t in (expert_gate_up, expert_down):
            std = t.float().std()
            t += (torch.randn(t.shape, generator=g) * std * cfg.upcycle_noise).to(t.dtype)
    if cfg.upcycle_reinit > 0:
        count = int(round(cfg.upcycle_reinit * m))
        if count == 0:
            return
        idx = torch.randperm(m, generator=g)[:count]
        h = expert_gate_up.shape[1]
        for offset, ref in ((0, ffn.gate), (m, ffn.up)):
            mean, std = ref.float().mean(), ref.float().std()
            fresh = torch.randn(count, h, generator=g) * std + mean
            expert_gate_up[offset + idx] = fresh.to(expert_gate_up.dtype)
        mean, std = ffn.down.float().mean(), ffn.down.float().std()
        fresh = torch.randn(h, count, generator=g) * std + mean
        expert_down[:, idx] = fresh.to(expert_down.dtype)


@register_method("upcycle", splits=False)
def upcycle(ffn: DenseFFN, ctx: LayerContext) -> LayerExperts:
    cfg = ctx.config
    e = cfg.experts
    gate_up = torch.cat([ffn.gate, ffn.up], dim=0).unsqueeze(0).repeat(e, 1, 1)
    down = ffn.down.unsqueeze(0).repeat(e, 1, 1)
    if cfg.upcycle_noise > 0 or cfg.upcycle_reinit > 0:
        for i in range(e):
            _perturb(gate_up[i], down[i], ffn, ctx, ffn.intermediate_size)
    out = LayerExperts(gate_up=gate_up, down=down)
    out.default_scale = activation_scale(1, cfg.routed_weight_sum)
    return out


@register_method("granular-upcycle", splits=False)
def granular_upcycle(ffn: DenseFFN, ctx: LayerContext) -> LayerExperts:
    cfg = ctx.config
    g_parts, e = cfg.granularity, cfg.experts
    m = ffn.intermediate_size // g_parts
    parts = [torch.arange(p * m, (p + 1) * m) for p in range(g_parts)]
    gate_up = torch.stack([torch.cat([ffn.gate[parts[i % g_parts]], ffn.up[parts[i % g_parts]]]) for i in range(e)])
    down = torch.stack([ffn.down[:, parts[i % g_parts]] for i in range(e)])
    if cfg.upcycle_noise > 0 or cfg.upcycle_reinit > 0:
        for i in range(e):
            _perturb(gate_up[i], down[i], ffn, ctx, m)
    out = LayerExperts(
        gate_up=gate_up,
        down=down,
        groups=[parts[i % g_parts] for i in range(e)],
        router_groups=torch.arange(e) // g_parts,
    )
    out.default_scale = activation_scale(g_parts, cfg.routed_weight_sum)
    return out
