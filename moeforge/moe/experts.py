"""Expert weights stored stacked, and the dropless sort-compute-combine execution.

Weight layout (``nn.Linear`` orientation, as transformers v5's Mixtral experts):

=============  ================  ===========================================
name           shape             meaning
=============  ================  ===========================================
gate_up_proj   (E, 2I, H)        SwiGLU: rows [0, I) gate, rows [I, 2I) up
up_proj        (E, I, H)         plain MLP (``glu=False``) input projection
down_proj      (E, H, I)         output projection
=============  ================  ===========================================
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MoeforgeError
from .fused import fused_expert_mlp, token_bags
from .kernels import grouped_linear
from .routing import Routing, expert_counts

EXECUTIONS = ("auto", "fused", "grouped")

_ACT = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def activation_fn(name: str):
    return _ACT[name]


class StackedExperts(nn.Module):
    """E feed-forward experts of intermediate width I, one tensor per projection.

    ``forward(x, routing)`` runs the dropless execution: sort the P (token, expert) pairs by
    expert once, gather the tokens into one contiguous (P, H) block, run every expert on its
    slice (one grouped matmul per projection on GPU; the fused workspace path of
    :mod:`moeforge.moe.fused` on CPU), scale by the routing weights and scatter-add once. No
    mask over all tokens is built per expert.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        expert_size: int,
        *,
        glu: bool = True,
        activation: str = "silu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.expert_size = expert_size
        self.glu = glu
        self.activation = activation
        self.act = activation_fn(activation)
        self.dropout = dropout
        self.execution = "auto"
        if glu:
            self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * expert_size, hidden_size))
            self.register_parameter("up_proj", None)
        else:
            self.up_proj = nn.Parameter(torch.empty(num_experts, expert_size, hidden_size))
            self.register_parameter("gate_up_proj", None)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, expert_size))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for p in (self.gate_up_proj, self.up_proj, self.down_proj):
            if p is not None:
                nn.init.normal_(p, std=std)

    @property
    def execution(self) -> str:
        """"auto": the fused workspace path on CPU, grouped matmuls elsewhere; "fused" / "grouped"
        force one (tests, benchmarks)."""
        return self._execution

    @execution.setter
    def execution(self, value: str) -> None:
        if value not in EXECUTIONS:
            raise MoeforgeError(f"unknown expert execution {value!r}; choose one of {', '.join(EXECUTIONS)}.")
        self._execution = value

    @property
    def in_proj(self) -> Tensor:
        return self.gate_up_proj if self.glu else self.up_proj

    def expert_forward(
        self, x_sorted: Tensor, offsets: Tensor, weight_sorted: Tensor | None = None, counts: list[int] | None = None
    ) -> Tensor:
        """Run expert e on rows [offsets[e-1], offsets[e]) of the expert-sorted (P, H) block.

        ``weight_sorted`` (P,) scales each row's intermediate activation before the down
        projection, which equals scaling the output (the down projection is linear) at I/H of
        the cost.
        """
        w_in, w_out = self.in_proj, self.down_proj
        if x_sorted.device.type != "cpu" and torch.is_autocast_enabled(x_sorted.device.type):
            # autocast does not cover grouped_mm: cast as it would for a linear layer (the casts are
            # differentiable), so a bf16-autocast step on a GPU takes the grouped GEMM, not a loop
            dtype = torch.get_autocast_dtype(x_sorted.device.type)
            x_sorted, w_in, w_out = x_sorted.to(dtype), w_in.to(dtype), w_out.to(dtype)
        h = grouped_linear(x_sorted, w_in, offsets, counts)
        if self.glu:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        if self.dropout > 0 and self.training:
            h = F.dropout(h, p=self.dropout, training=True)
        if weight_sorted is not None:
            h = h * weight_sorted.to(h.dtype).unsqueeze(-1)
        return grouped_linear(h, w_out, offsets, counts)

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        """Apply the routed experts.

        Args:
            x: (T, H) tokens.
            routing: the router's decisions for these T tokens.
        Returns:
            (T, H) sum over each token's pairs of weight * expert(x); zero for dropped tokens.
        """
        tokens, hidden = x.shape
        w = self.in_proj
        # a lower-precision input, or another 16-bit format (float16 into bfloat16 weights), needs
        # autocast; a higher-precision one is the fused path's inference upcast, one expert at a time
        if x.dtype != w.dtype and (x.dtype.itemsize <= w.dtype.itemsize or not self._use_fused(x)):
            if not torch.is_autocast_enabled(x.device.type):
                raise MoeforgeError(
                    f"the MoE layer's input is {str(x.dtype).removeprefix('torch.')} but its expert weights are "
                    f"{str(w.dtype).removeprefix('torch.')}; cast the model (model.to(dtype)) or the input to one "
                    "dtype, or run under torch.autocast."
                )
            if x.device.type == "cpu":  # CPU autocast: the fused path computes in the weights' precision
                x = x.to(w.dtype)
        if routing.expert_index.numel() == 0:
            return x.new_zeros(tokens, hidden) + 0.0 * routing.weight.sum()
        order = torch.argsort(routing.expert_index.to(torch.int32), stable=True)  # int32 sorts ~2x faster on CPU
        counts = expert_counts(routing.expert_index, self.num_experts)
        token_sorted = routing.token_index[order]
        weight_sorted = routing.weight[order]
        if self._use_fused(x):
            bags = token_bags(token_sorted, tokens, order, routing.slots)
            return fused_expert_mlp(
                x, weight_sorted, self.in_proj, self.down_proj, token_sorted, counts.tolist(), self.act, self.glu, bags
            )
        offsets = torch.cumsum(counts, dim=0).to(torch.int32)
        y_sorted = self.expert_forward(x.index_select(0, token_sorted), offsets, weight_sorted)
        return x.new_zeros(tokens, hidden, dtype=y_sorted.dtype).index_add_(0, token_sorted, y_sorted).to(x.dtype)

    @property
    def upcasts_weights_per_expert(self) -> bool:
        """Whether a forward pass on float32 inputs may keep these weights in a lower precision:
        the fused CPU path upcasts one expert's slice at a time (inference only), so a float32
        check of a float16 model never holds all experts in float32 (:mod:`moeforge.convert.verify`)."""
        return self.execution != "grouped" and self.in_proj.device.type == "cpu" and not self.training

    def _use_fused(self, x: Tensor) -> bool:
        if self.execution == "grouped":
            return False
        if self.dropout > 0 and self.training:
            return False
        return self.execution == "fused" or x.device.type == "cpu"

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, hidden={self.hidden_size}, expert_size={self.expert_size}, "
            f"glu={self.glu}, act={self.activation}"
        )


class DenseMLP(nn.Module):
    """A dense (Swi)GLU or plain MLP with ``nn.Linear`` layers named like LLaMA's.

    Used for always-on shared experts: S shared experts of width I are stored as one MLP of
    width S * I, which computes exactly the sum of the S experts.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, *, glu: bool = True, activation: str = "silu") -> None:
        super().__init__()
        self.glu = glu
        self.act = activation_fn(activation)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False) if glu else None
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        for lin in (self.up_proj, self.gate_proj, self.down_proj):
            if lin is not None:
                nn.init.normal_(lin.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up_proj(x)
        h = self.act(self.gate_proj(x)) * h if self.glu else self.act(h)
        return self.down_proj(h)

