"""MoLoRA and LoRA: low-rank updates added to a frozen Linear, mixed per token by a router.

LoRA (Hu et al. 2021, arXiv 2106.09685, eq. 3): y = W x + (α/r) B A x, A random, B = 0.
MoLoRA (Zadouri et al. 2023, arXiv 2309.05444, sec. 2.2): y = W x + (α/r) Σ_i s_i B_i A_i x with
s = softmax(W_g x) (soft merging) or its top-k, not renormalised (the authors' code).

All experts run batched, with no loop over experts: the E down-projections are one matmul
x (N, d_in) @ A (d_in, E·r); the router weights scale each expert's r-slice; the E
up-projections are one matmul (N, E·r) @ B (E·r, d_out), which also performs the sum over experts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import AdapterLayer
from .context import AdapterContext
from .router import AdapterRouter


class MoLoRALayer(AdapterLayer):
    """A frozen Linear plus E LoRA experts (E = 1 without router: plain LoRA).

    Parameters:
        lora_A: (E, in_features, r) float32, N(0, init_std^2) (paper's code: 0.02).
        lora_B: (E, r, out_features) float32, zeros, so the layer equals the base at init.
        router.weight: (E, router_features) float32, N(0, router_init_std^2), when routed.
    """

    adapter_parameter_names = ("lora_A", "lora_B")

    def __init__(
        self,
        base_layer: nn.Linear,
        name: str,
        context: AdapterContext,
        *,
        num_experts: int,
        rank: int,
        alpha: float,
        router_input: str | None,
        router_features: int | None = None,
        top_k: int | None = None,
        dropout: float = 0.0,
        init_std: float = 0.02,
        router_init_std: float = 0.02,
    ) -> None:
        super().__init__(base_layer, name, context)
        self.num_experts = num_experts
        self.rank = rank
        self.scaling = float(alpha) / rank
        self.router_input = router_input
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(num_experts, base_layer.in_features, rank, dtype=torch.float32, device=device))
        nn.init.normal_(self.lora_A, mean=0.0, std=init_std)
        self.lora_B = nn.Parameter(torch.zeros(num_experts, rank, base_layer.out_features, dtype=torch.float32, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.router = None
        if router_input is not None:
            self.router = AdapterRouter(router_features, num_experts, top_k=top_k, init_std=router_init_std, device=device)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if self.disabled:
            return y
        return y + self.delta(x)

    def delta(self, x: Tensor) -> Tensor:
        """(α/r) Σ_i s_i B_i A_i x for ``x`` (..., in_features) -> (..., out_features)."""
        e, r = self.num_experts, self.rank
        h = self.dropout(x)
        a = self.lora_A.to(h.dtype).transpose(0, 1).reshape(self.base_layer.in_features, e * r)  # (in, E·r)
        down = torch.matmul(h, a)  # (..., E·r)
        if self.router is not None:
            source = x if self.router_input == "input" else self.context.sentence_for(x)
            probs = self.router(source)  # (..., E) float32
            self.context.record(self.module_name, probs)
            down = (down.unflatten(-1, (e, r)) * probs.to(down.dtype).unsqueeze(-1)).flatten(-2)
        b = self.lora_B.to(h.dtype).reshape(e * r, self.base_layer.out_features)  # (E·r, out)
        return torch.matmul(down, b) * self.scaling

    def merged_linear(self) -> nn.Linear:
        if self.router is not None:
            return super().merged_linear()
        base = self.base_layer
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            update = (self.lora_A[0] @ self.lora_B[0]).t() * self.scaling  # (out, in)
            merged.weight.copy_(base.weight + update.to(base.weight.dtype))
            if base.bias is not None:
                merged.bias.copy_(base.bias)
        return merged

    def extra_repr(self) -> str:
        kind = "lora" if self.router is None else f"molora, experts={self.num_experts}, router_input={self.router_input}"
        return f"{kind}, rank={self.rank}, scaling={self.scaling:g}"
