"""Merging several dense models into one MoE (``--method merge``).

Expert e of every converted layer is the FFN of the e-th expert model at that layer, unchanged;
attention, norms, embeddings and head come from the input ("base") model, as in mergekit-moe,
or are averaged over the expert models (``--merge-shared average``), as in Branch-Train-MiX
(Sukhbaatar et al. 2024, arXiv 2403.07816, sec. 2.2: "we average the parameters of the
non-feedforward sublayers"). The expert models are typically fine-tunes of the base model on
different domains; the router then decides, per token, whose FFN runs (``--gate-init domain``
fits it on each expert's own text, see :mod:`moeforge.convert.gate_init`).

Every expert is a whole dense FFN, so the output scale follows upcycling's rule: 1 over a token's
summed routing weights. With a renormalising router (top-k with renormalised weights, noisy top-k,
sigmoid_bias with renormalisation) that is 1 and an MoE whose experts are all the base FFN
reproduces the base model exactly. For raw weights (``--no-normalize-weights``, switch, raw
sigmoid) the sum depends on the router: E/k-style factors assume a near-uniform router (random,
uniform), while a ``--gate-init domain`` router is confident, so there ``--rescale auto`` divides
by the mean summed weight it gives the calibration tokens (``routed_weight_sum`` in the layer's
report; expert choice, which routes across a batch, keeps E/c).
"""

from __future__ import annotations

import functools

import torch

from .base import DenseFFN, LayerContext, LayerExperts, register_method
from .upcycle import activation_scale


@register_method("merge", splits=False)
def merge(ffn: DenseFFN, ctx: LayerContext) -> LayerExperts:
    if ctx.expert_ffns is None or len(ctx.expert_ffns) != ctx.config.experts:
        raise RuntimeError("internal error: method merge needs one FFN per expert model for this layer")
    # the experts' own precision (promoted when they differ), not the input model's: the export's cast
    # to its dtype (--dtype) is then the only rounding, e.g. float32 fine-tunes of a bfloat16 model
    dtype = functools.reduce(torch.promote_types, [f.gate.dtype for f in ctx.expert_ffns])
    gate_up = torch.stack([torch.cat([f.gate.to(dtype), f.up.to(dtype)], dim=0) for f in ctx.expert_ffns])
    down = torch.stack([f.down.to(dtype) for f in ctx.expert_ffns])
    out = LayerExperts(gate_up=gate_up, down=down)
    out.default_scale = activation_scale(1, ctx.config.routed_weight_sum)
    return out
