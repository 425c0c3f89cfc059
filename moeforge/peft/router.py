"""The adapter router: dense mixing weights over E adapter experts, computed in float32.

Zadouri et al. 2023 (sec. 2.2) route each token with s = softmax(W_g x) and merge all experts
with these weights ("soft merging"); their code builds W_g without bias, initialised
N(0, 0.02^2), and computes the router in float32. The top-k option keeps the k largest weights
per token as they are, without renormalising (the paper's discrete-routing ablation, as its
code computes ``router_probabilities * topk_mask``): renormalised, a top-1 weight would be
exactly 1 whatever the logits, and the router would get no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..utils.precision import autocast_off


class AdapterRouter(nn.Module):
    """W_g (E, d), bias-free, float32. ``forward(x (..., d)) -> probs (..., E)`` float32.

    With soft merging the rows of ``probs`` sum to one; with ``top_k`` only the k largest entries
    per row are kept (not renormalised, so they sum to less), the rest are zero.
    """

    def __init__(self, in_features: int, num_experts: int, *, top_k: int | None = None, init_std: float = 0.02,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_experts = num_experts
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, dtype=torch.float32, device=device))
        nn.init.normal_(self.weight, mean=0.0, std=init_std)

    def logits(self, x: Tensor) -> Tensor:
        """(..., E) float32 router logits; the input is upcast to float32 first."""
        return torch.matmul(x.float(), self.weight.float().t())

    def forward(self, x: Tensor) -> Tensor:
        with autocast_off(x.device.type):  # autocast would run the matmul in bf16/fp16
            return self._probs(x)

    def _probs(self, x: Tensor) -> Tensor:
        probs = torch.softmax(self.logits(x), dim=-1)
        if self.top_k is None or self.top_k >= self.num_experts:
            return probs
        values, index = probs.topk(self.top_k, dim=-1)
        return torch.zeros_like(probs).scatter(-1, index, values)

    def extra_repr(self) -> str:
        merge = "soft" if self.top_k is None else f"top-{self.top_k}"
        return f"in_features={self.in_features}, num_experts={self.num_experts}, merging={merge}"
