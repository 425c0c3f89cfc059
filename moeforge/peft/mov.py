"""MoV and (IA)^3: learned rescaling vectors on a Linear's output (keys, values) or input (FFN).

(IA)^3 (Liu et al. 2022, arXiv 2205.05638, sec. 3.3): y = l ⊙ a with one learned vector l per
module, initialised to ones. MoV (Zadouri et al. 2023, arXiv 2309.05444, eq. 4): E vectors
l_1..l_E and a router; y = a ⊙ Σ_i s_i l_i with s = softmax(W_g r). Soft merging computes the
weighted vector first and rescales once, so the cost is one (tokens, E) x (E, d) matmul. It is
computed as 1 + Σ_i s_i (l_i - 1), which is the same when the weights sum to one and, for top-k
routing (weights not renormalised), gives the unkept weight 1 - Σ s_i to the identity vector, so
a top-k MoV starts equal to the base model.

Keys and values are rescaled per head (the paper's ``MoVAttention``): the activation (..., h·d_h)
is viewed as (..., h, d_h); the router (E, d_h), shared across heads, routes each head's slice,
and each head has its own E vectors (stored as rows of ``vectors`` (E, h·d_h)).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import MoeforgeError
from .base import AdapterLayer
from .context import AdapterContext
from .router import AdapterRouter


class MoVLayer(AdapterLayer):
    """A frozen Linear with MoV (E ≥ 1, with router) or (IA)^3 (E = 1, ``router_input=None``) vectors.

    Args:
        base_layer: the frozen ``nn.Linear`` (out, in).
        position: "output" rescales ``base(x)`` (keys, values); "input" rescales ``x`` before the
            Linear (the FFN intermediate activation entering the down projection).
        num_experts: E.
        router_input: "activation", "block", "sentence", or None for (IA)^3 (no router).
        heads: split an output activation into this many heads for per-head routing (1: no split).
        router_features: width of the router input (d_h, d_in, d_out or the embedding width).
    Parameters:
        vectors: (E, d) float32, ones at init; d = out_features for "output", in_features for "input".
        router.weight: (E, router_features) float32, N(0, init_std^2).
    """

    adapter_parameter_names = ("vectors",)
    # weight decay would pull the vectors toward 0 (an activation scaled away), not to the identity 1
    no_weight_decay = ("vectors",)

    def __init__(
        self,
        base_layer: nn.Linear,
        name: str,
        context: AdapterContext,
        *,
        position: str,
        num_experts: int,
        router_input: str | None,
        heads: int = 1,
        router_features: int | None = None,
        top_k: int | None = None,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(base_layer, name, context)
        if position not in ("input", "output"):
            raise ValueError(f"position must be 'input' or 'output', got {position!r}")
        self.position = position
        self.num_experts = num_experts
        self.router_input = router_input
        width = base_layer.in_features if position == "input" else base_layer.out_features
        if heads > 1 and width % heads:
            raise MoeforgeError(f"{name}: width {width} is not divisible into {heads} heads; set head_dim correctly.")
        self.heads = heads
        device = base_layer.weight.device
        self.vectors = nn.Parameter(torch.ones(num_experts, width, dtype=torch.float32, device=device))
        self.router = None
        if router_input is not None:
            self.router = AdapterRouter(router_features, num_experts, top_k=top_k, init_std=init_std, device=device)

    def forward(self, x: Tensor) -> Tensor:
        if self.disabled:
            return self.base_layer(x)
        if self.position == "input":
            return self.base_layer(x * self.scale(x, block=self.block_input))
        y = self.base_layer(x)
        return y * self.scale(y, block=x)

    def scale(self, activation: Tensor, block: Tensor | None = None) -> Tensor:
        """The merged vector Σ_i s_i l_i for ``activation`` (..., d), in the activation's dtype.

        Computed as 1 + Σ_i s_i (l_i - 1), equal since the weights s sum to one; at init (l_i = 1)
        it is exactly one whatever the rounding of s, so the adapted model starts bit-identical.
        """
        if self.router is None:
            return self.vectors[0].to(activation.dtype)
        if self.router_input == "activation" and self.heads > 1:
            per_head = activation.unflatten(-1, (self.heads, -1))  # (..., h, d_h)
            probs = self.router(per_head)  # (..., h, E)
            self.context.record(self.module_name, probs)
            offsets = (self.vectors.float() - 1.0).view(self.num_experts, self.heads, -1)  # (E, h, d_h)
            merged = 1.0 + torch.einsum("...he,ehd->...hd", probs, offsets).flatten(-2)
            return merged.to(activation.dtype)
        if self.router_input == "activation":
            source = activation
        elif self.router_input == "block":
            if block is None:
                raise MoeforgeError(
                    f"{self.module_name}: router_input='block' needs the block input, which is captured when the "
                    "whole adapted model runs; call the model, not this layer on its own."
                )
            source = block
        else:
            source = self.context.sentence_for(activation)
        probs = self.router(source)  # (..., E)
        self.context.record(self.module_name, probs)
        return (1.0 + torch.matmul(probs, self.vectors.float() - 1.0)).to(activation.dtype)

    def merged_linear(self) -> nn.Linear:
        if self.router is not None:
            return super().merged_linear()
        base = self.base_layer
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            v = self.vectors[0].to(base.weight.dtype)
            if self.position == "output":
                merged.weight.copy_(base.weight * v[:, None])
                if base.bias is not None:
                    merged.bias.copy_(base.bias * v)
            else:
                merged.weight.copy_(base.weight * v[None, :])
                if base.bias is not None:
                    merged.bias.copy_(base.bias)
        return merged

    def extra_repr(self) -> str:
        kind = "ia3" if self.router is None else f"mov, experts={self.num_experts}, router_input={self.router_input}"
        return f"{kind}, rescales={self.position}, heads={self.heads}"
