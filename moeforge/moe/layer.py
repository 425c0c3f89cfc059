"""The one feed-forward MoE layer every moeforge model uses."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import MoeforgeError
from .config import MoEConfig
from .experts import DenseMLP, StackedExperts
from .routers import Router, SigmoidBiasRouter, build_router
from .routing import Routing


@dataclass
class MoEOutput:
    """Result of :meth:`MoELayer.forward`.

    Attributes:
        hidden_states: same shape as the input, (..., H).
        aux_loss: scalar sum of the router's weighted auxiliary losses (0 when there are none).
        aux_losses: name -> weighted scalar loss.
        routing: the router's decisions (tensors attached to the graph; call ``.detach()`` to keep);
            with a ``token_mask``, token-choice routing covers the unmasked tokens only, in order.
    """

    hidden_states: Tensor
    aux_loss: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    routing: Routing | None = None


class MoELayer(nn.Module):
    """Feed-forward Mixture-of-Experts: y = scale * sum_{(e, w) routed} w * E_e(x) + shared(x).

    Routed experts are stored stacked (:class:`StackedExperts`), the router is chosen by name
    (:data:`moeforge.moe.ROUTERS`) and runs in float32, shared experts (if any) see every token,
    optionally scaled by a learned per-token gate sigmoid(x . w) (Qwen2-MoE's ``shared_expert_gate``).
    Auxiliary losses are returned in :class:`MoEOutput`, never stored on the module.

    Input (B, S, H) or (T, H); output the same shape.
    """

    def __init__(self, config: MoEConfig | dict) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = MoEConfig.from_dict(config)
        elif not isinstance(config, MoEConfig):
            raise MoeforgeError(f"MoELayer takes a MoEConfig (or a dict of its fields), got {type(config).__name__}.")
        self.config = config
        self.router: Router = build_router(config)
        self.experts = StackedExperts(
            config.num_experts,
            config.hidden_size,
            config.expert_size,
            glu=config.glu,
            activation=config.activation,
            dropout=config.expert_dropout,
        )
        if config.num_shared_experts > 0:
            self.shared_experts = DenseMLP(
                config.hidden_size,
                config.num_shared_experts * config.shared_size,
                glu=config.glu,
                activation=config.activation,
            )
        else:
            self.shared_experts = None
        if config.shared_expert_gate:
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
            nn.init.normal_(self.shared_expert_gate.weight, std=0.02)
        else:
            self.shared_expert_gate = None

    def forward(self, hidden_states: Tensor, token_mask: Tensor | None = None) -> MoEOutput:
        """Route and run the experts.

        Args:
            hidden_states: (B, S, H) or (T, H).
            token_mask: optional bool, shape (B, S) or (T,), False for padding. Padding is not
                routed: it gets no routed output, no expert capacity or choice, and no share in
                the aux losses or loads (as transformers' Mixtral loss with an attention mask).
                Token-choice routers then see the valid tokens only, so ``routing`` indexes them
                in order; expert choice keeps the full grid and never picks padding.
        """
        shape = hidden_states.shape
        if hidden_states.dim() == 0 or shape[-1] != self.config.hidden_size:
            raise MoeforgeError(
                f"MoELayer expects inputs of shape (..., {self.config.hidden_size}) (hidden_size), got {tuple(shape)}."
            )
        x = hidden_states.reshape(-1, shape[-1])
        eps = self.config.input_jitter
        if self.training and eps > 0:  # Mixtral's router_jitter_noise: the experts see the jittered input too
            x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        batch_shape = tuple(shape[:-1]) if hidden_states.dim() == 3 else None
        valid = None
        if token_mask is not None:
            valid = token_mask.reshape(-1).to(device=x.device, dtype=torch.bool)
            if valid.numel() != x.shape[0]:
                raise MoeforgeError(
                    f"token_mask has {valid.numel()} entries for {x.shape[0]} tokens; give one per token ({tuple(shape[:-1])})."
                )
        if valid is None:
            routing = self.router(x, batch_shape)
            y = self.experts(x, routing)
        elif self.router.handles_token_mask:
            routing = self.router(x, batch_shape, token_mask=valid)
            y = self.experts(x, routing)
        else:
            keep = valid.nonzero().squeeze(1)
            xs = x.index_select(0, keep)
            routing = self.router(xs, None)
            y = x.new_zeros(x.shape).index_copy(0, keep, self.experts(xs, routing).to(x.dtype))
        if self.config.output_scale != 1.0:
            y = y * self.config.output_scale
        if self.shared_experts is not None:
            shared = self.shared_experts(x)
            if self.shared_expert_gate is not None:  # Qwen2-MoE: sigmoid(x . w) * shared(x)
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        if routing.aux_losses:
            aux_loss = torch.stack(list(routing.aux_losses.values())).sum()
        else:
            aux_loss = x.new_zeros((), dtype=torch.float32)
        return MoEOutput(y.view(shape).to(hidden_states.dtype), aux_loss, routing.aux_losses, routing)

    # ------------------------------------------------------------------ accounting
    def num_parameters(self) -> tuple[int, int]:
        """(total, active per token) parameter counts of this layer (router included; the active count
        leaves out noisy top-k's noise weights, which only training uses)."""
        c = self.config
        mats = 3 if c.glu else 2
        expert = mats * c.hidden_size * c.expert_size
        shared = mats * c.hidden_size * c.shared_size * c.num_shared_experts + (c.hidden_size if c.shared_expert_gate else 0)
        router = sum(p.numel() for p in self.router.parameters())
        # noisy top-k's noise weights shape training-time noise only; no token uses them at inference
        router_active = sum(p.numel() for name, p in self.router.named_parameters() if name != "noise")
        total = c.num_experts * expert + shared + router
        active_k = c.top_k
        if c.router == "expert_choice":
            active_k = c.num_experts * min(1.0, (c.capacity_factor or 2.0) / c.num_experts)
        elif c.router == "switch":
            active_k = 1
        active = int(active_k * expert) + shared + router_active
        return total, active

    def flops_per_token(self) -> int:
        """Forward FLOPs per token (2 per multiply-accumulate), router included."""
        _, active = self.num_parameters()
        return 2 * active

    def extra_repr(self) -> str:
        c = self.config
        return f"router={c.router}, experts={c.num_experts}, top_k={c.top_k}, shared={c.num_shared_experts}"


def update_router_biases(model: nn.Module) -> int:
    """Apply the aux-loss-free bias update of every ``sigmoid_bias`` router in ``model``.

    Call after each optimiser step. Returns the number of routers updated.
    """
    n = 0
    for module in model.modules():
        if isinstance(module, SigmoidBiasRouter):
            module.update_bias()
            n += 1
    return n
