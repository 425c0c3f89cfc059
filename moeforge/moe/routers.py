"""Routers: map tokens (T, H) to a :class:`~moeforge.moe.routing.Routing`.

Every router computes its logits in float32 whatever the model dtype (Switch Transformer's
selective precision, Fedus et al. 2021, sec. 2.4): the input and weight are upcast before the
matmul and the softmax/sigmoid runs in float32. Auxiliary losses are returned in the Routing,
already scaled by their coefficients; nothing is stored on the module between calls except the
``sigmoid_bias`` router's load statistics, which are its documented state.

Register a new router with ``@register_router("name")``; an unknown name lists the known ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MoeforgeError, unknown_name
from ..utils.precision import at_least_float32, autocast_off
from .config import MoEConfig
from .losses import cv_squared, load_balancing_loss, noisy_topk_load, router_z_loss
from .routing import Routing, expert_counts, token_choice

ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str) -> Callable[[type[Router]], type[Router]]:
    """Class decorator adding a router to :data:`ROUTERS` under ``name``."""

    def wrap(cls: type[Router]) -> type[Router]:
        if name in ROUTERS:
            raise ValueError(f"router {name!r} is already registered")
        ROUTERS[name] = cls
        cls.name = name
        return cls

    return wrap


def build_router(config: MoEConfig) -> Router:
    """Instantiate the router ``config.router`` names."""
    if config.router not in ROUTERS:
        raise unknown_name("router", config.router, ROUTERS)
    return ROUTERS[config.router](config)


def ceil_tokens(tokens: float) -> int:
    """ceil of a per-expert token count computed in floating point, ignoring the product's rounding
    error: capacity factors such as 1.1 have no exact binary value, so 100 / 2 * 1.1 evaluates to
    55.00000000000001, whose plain ceil would give every expert 56 slots instead of 55."""
    return math.ceil(tokens - abs(tokens) * 1e-12)


def ceil_tokens_tensor(tokens: Tensor) -> Tensor:
    """:func:`ceil_tokens` elementwise, for a float64 tensor of counts (long result)."""
    return torch.ceil(tokens - tokens.abs() * 1e-12).long()


# std of a standard normal truncated to (-2, 2): TF's VarianceScaling divides by it so that the
# truncated draw has the intended std
_TRUNCATED_STD = 0.87962566103423978


def switch_router_init_(weight: Tensor, std: float | None = None) -> Tensor:
    """Switch Transformer's router init (Fedus et al. 2021, sec. 2.4): a normal truncated at two
    standard deviations whose std after truncation is sqrt(0.1 / H) (TF's VarianceScaling with
    scale 0.1, fan-in H), or ``std`` when given (then used as is)."""
    if std is None:
        std = math.sqrt(0.1 / weight.shape[-1]) / _TRUNCATED_STD
    with torch.no_grad():
        return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


class Router(nn.Module):
    """Base router: a bias-free linear gate W (E, H) applied in float32.

    Subclasses implement :meth:`route`. The weight is created in float32; if the model is cast
    to a lower precision, the matmul still runs on float32 copies.
    """

    name = "base"
    default_aux_loss_coef = 0.0
    handles_token_mask = False
    """Whether :meth:`route` takes a ``token_mask``; other routers are given the valid tokens only."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, dtype=torch.float32))
        self.reset_parameters()

    @classmethod
    def validate(cls, config: MoEConfig) -> None:
        """Router-specific checks of a config; raise :class:`MoeforgeError` on a bad value."""

    @property
    def aux_loss_coef(self) -> float:
        c = self.config.aux_loss_coef
        return self.default_aux_loss_coef if c is None else c

    def reset_parameters(self) -> None:
        std = self.config.router_init_std
        nn.init.normal_(self.weight, std=0.02 if std is None else std)

    def logits(self, x: Tensor) -> Tensor:
        """(T, H) -> (T, E) logits in float32 (float64 for float64 inputs: never below float32)."""
        dt = at_least_float32(x.dtype)
        return F.linear(x.to(dt), self.weight.to(dt))

    def forward(self, x: Tensor, batch_shape: tuple[int, ...] | None = None, token_mask: Tensor | None = None) -> Routing:
        """Route ``x`` (T, H); ``batch_shape`` is the (B, S) the T tokens came from, if any;
        ``token_mask`` (T,) bool marks real tokens (routers with ``handles_token_mask`` only).

        Under autocast (bf16 training) the router still computes in float32: autocast would
        otherwise run its matmuls in the low precision whatever the operands' dtype.
        """
        kw = {}
        if token_mask is not None:
            if not self.handles_token_mask:
                raise MoeforgeError(f"the {self.name} router takes no token_mask; route the unmasked tokens only.")
            kw["token_mask"] = token_mask
        with autocast_off(x.device.type):
            return self.route(x, batch_shape, **kw)

    def route(self, x: Tensor, batch_shape: tuple[int, ...] | None) -> Routing:  # pragma: no cover
        raise NotImplementedError

    def _z_loss(self, logits: Tensor, losses: dict[str, Tensor]) -> None:
        if self.training and self.config.z_loss_coef > 0:  # a training loss, as the balance losses
            losses["z_loss"] = self.config.z_loss_coef * router_z_loss(logits)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}"


@register_router("topk")
class TopKRouter(Router):
    """Softmax then top-k (Mixtral; Jiang et al. 2024).

    p = softmax(W x) in float32; the k largest p are kept; with ``normalize_weights`` they are
    renormalised to sum to 1 (Mixtral), otherwise the raw probabilities are used (Qwen-MoE with
    ``norm_topk_prob=False``). Aux loss: alpha * E * sum_i f_i P_i per layer (Mixtral's
    ``load_balancing_loss_func`` on this layer's tokens; padding left out), default alpha 1e-3,
    plus optional z-loss. The model sums the layers' losses, where transformers computes one loss
    over all layers' tokens (about their mean): importing or exporting a Mixtral/Qwen2-MoE
    checkpoint divides or multiplies ``router_aux_loss_coef`` by the number of MoE layers.
    """

    default_aux_loss_coef = 1e-3

    def route(self, x: Tensor, batch_shape: tuple[int, ...] | None) -> Routing:
        logits = self.logits(x)
        probs = logits.softmax(dim=-1)
        weight, index = probs.topk(self.top_k, dim=-1)
        if self.config.normalize_weights:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        losses: dict[str, Tensor] = {}
        if self.training and self.aux_loss_coef > 0:
            losses["balance_loss"] = self.aux_loss_coef * load_balancing_loss(probs, index, self.num_experts)
        self._z_loss(logits, losses)
        return token_choice(index, weight, logits=logits, probs=probs, num_experts=self.num_experts, aux_losses=losses)


@register_router("noisy_topk")
class NoisyTopKRouter(Router):
    """Noisy top-k gating (Shazeer et al. 2017) as LLaMA-MoE's TopKBalancedNoisyGate trains it.

    H(x) = clean(x) + eps * (softplus(W_noise x) + floor), eps ~ N(0, 1) in training only;
    G(x) = softmax over the k kept logits of H (the rest are -inf, i.e. weight 0).
    clean(x) = W_g x, or Linear(H, E) -> tanh -> Linear(E, E) with ``router_mlp`` (LLaMA-MoE).
    W_noise starts at zero, so the initial noise std is softplus(0) + floor = log 2 + 1e-2 ≈ 0.70.
    Aux loss (training only): w * (CV^2(importance) + CV^2(load)), importance_i = sum_x G_i(x),
    load_i the smooth Normal-CDF estimate (:func:`~moeforge.moe.losses.noisy_topk_load`); w 1e-2.
    """

    default_aux_loss_coef = 1e-2

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        e = config.num_experts
        self.noise = nn.Parameter(torch.zeros(e, config.hidden_size, dtype=torch.float32))
        if config.router_mlp:
            self.mlp_out = nn.Parameter(torch.empty(e, e, dtype=torch.float32))
            nn.init.normal_(self.mlp_out, std=1.0 / math.sqrt(e))
        else:
            self.register_parameter("mlp_out", None)

    def clean_logits(self, x: Tensor) -> Tensor:
        logits = self.logits(x)
        if self.mlp_out is not None:
            logits = F.linear(torch.tanh(logits), self.mlp_out.to(logits.dtype))
        return logits

    def route(self, x: Tensor, batch_shape: tuple[int, ...] | None) -> Routing:
        k, e = self.top_k, self.num_experts
        clean = self.clean_logits(x)
        noisy_training = self.training and k < e
        if noisy_training:
            dt = at_least_float32(x.dtype)
            noise_std = F.softplus(F.linear(x.to(dt), self.noise.to(dt))) + self.config.noise_floor
            noisy = clean + torch.randn_like(clean) * noise_std
        else:
            noisy = clean
        top_values, top_index = noisy.topk(min(k + 1, e), dim=-1)
        kept_values, kept_index = top_values[:, :k], top_index[:, :k]
        weight = kept_values.softmax(dim=-1)
        probs = clean.softmax(dim=-1)
        losses: dict[str, Tensor] = {}
        if self.training and self.aux_loss_coef > 0:
            gates = torch.zeros_like(clean).scatter(1, kept_index, weight)
            importance = gates.sum(dim=0)
            if noisy_training:
                load = noisy_topk_load(clean, noisy, noise_std, top_values, k)
            else:
                load = (gates > 0).float().sum(dim=0)
            losses["balance_loss"] = self.aux_loss_coef * (cv_squared(importance) + cv_squared(load))
        self._z_loss(clean, losses)
        return token_choice(kept_index, weight, logits=clean, probs=probs, num_experts=e, aux_losses=losses)


@register_router("switch")
class SwitchRouter(Router):
    """Switch Transformer top-1 routing with expert capacity (Fedus et al. 2021).

    In training the router input is jittered multiplicatively, x * U(1 - eps, 1 + eps) (eps 0.01,
    as transformers' SwitchTransformers). p = softmax(W x) in float32; each token goes to
    argmax p with weight p_max. Capacity = ceil(T / E * capacity_factor) (default factor 1.25)
    tokens per expert per batch; overflow tokens are dropped (``Routing.dropped``), get zero
    from the layer and pass through on the residual. Which tokens overflow: the last in the
    flattened batch first (``drop_policy="position"``: row by row, positions in order, against
    one batch-wide capacity; transformers' SwitchTransformers instead gives each sequence its own
    capacity) or lowest router probability first ("probability", batch-prioritized routing). In eval mode every token is routed unless
    ``eval_capacity_factor`` sets a capacity (a decoder's output must not depend on the batch or
    on the KV cache). Aux: alpha * E * sum_i f_i P_i with alpha 1e-2, f_i the fraction
    of tokens whose argmax is i; optional z-loss. Init: :func:`switch_router_init_` (std
    sqrt(0.1 / H) after truncation, scale 0.1).
    """

    default_aux_loss_coef = 1e-2

    def reset_parameters(self) -> None:
        switch_router_init_(self.weight, self.config.router_init_std)

    @property
    def capacity_factor(self) -> float:
        c = self.config.capacity_factor
        return 1.25 if c is None else c

    def capacity(self, tokens: int) -> int | None:
        """Tokens per expert for a batch of ``tokens``; None when every token is routed (eval mode
        without ``eval_capacity_factor``)."""
        factor = self.capacity_factor if self.training else self.config.eval_capacity_factor
        if factor is None:
            return None
        return max(1, ceil_tokens(tokens / self.num_experts * factor))

    def route(self, x: Tensor, batch_shape: tuple[int, ...] | None) -> Routing:
        eps = 0.01 if self.config.jitter_eps is None else self.config.jitter_eps
        x = x.to(at_least_float32(x.dtype))
        if self.training and eps > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        logits = self.logits(x)
        probs = logits.softmax(dim=-1)
        gate, expert = probs.max(dim=-1)
        tokens, e = probs.shape
        capacity = self.capacity(tokens)
        if capacity is None:  # eval without a capacity: every token is routed
            keep = torch.ones_like(expert, dtype=torch.bool)
        else:
            one_hot = F.one_hot(expert, e)
            if self.config.drop_policy == "probability":
                order = torch.argsort(gate.detach(), descending=True, stable=True)
                rank = torch.empty_like(order)
                rank[order] = torch.arange(tokens, device=order.device)
                position_sorted = torch.cumsum(one_hot[order], dim=0)
                position = (position_sorted * one_hot[order]).sum(-1)[rank] - 1
            else:
                position = (torch.cumsum(one_hot, dim=0) * one_hot).sum(-1) - 1
            keep = position < capacity
        kept = keep.nonzero(as_tuple=True)[0]
        losses: dict[str, Tensor] = {}
        if self.training and self.aux_loss_coef > 0:
            losses["balance_loss"] = self.aux_loss_coef * load_balancing_loss(probs, expert[:, None], e)
        self._z_loss(logits, losses)
        no_drop = bool(keep.all())
        return Routing(
            token_index=kept,
            expert_index=expert[kept],
            weight=gate[kept],
            logits=logits,
            probs=probs,
            num_experts=e,
            slots=1 if no_drop else None,
            dropped=~keep,
            aux_losses=losses,
        )


@register_router("expert_choice")
class ExpertChoiceRouter(Router):
    """Expert Choice routing (Zhou et al. 2022): experts pick tokens, not tokens experts.

    S = softmax(W x) over experts (float32). Default: within each sequence of S tokens, every
    expert takes its top C = ceil(S * c / E) tokens by score (c = ``capacity_factor``, default 2),
    with weight S[token, expert]; a token may get 0..E experts; no aux loss is needed. With a
    ``token_mask``, S counts each group's real tokens only (padding neither is picked nor enlarges
    the capacity, so a sequence's output does not depend on its padding). This uses
    future tokens, so in a decoder it leaks information: it must be opted into with
    ``allow_future_tokens=True``. The causal-safe variant (``expert_choice_causal=True``) makes
    each expert choose among the B tokens that share a position across the batch (capacity
    ceil(B * c / E)), so position t never depends on later positions; with B = 1 every expert
    takes the token.
    """

    @classmethod
    def validate(cls, config: MoEConfig) -> None:
        if not config.expert_choice_causal and not config.allow_future_tokens:
            raise MoeforgeError(
                "the expert_choice router selects tokens across the whole sequence, so a token's output "
                "depends on later tokens (a leak in a decoder). Set expert_choice_causal=True for the "
                "causal-safe variant (experts choose across the batch at each position), or "
                "allow_future_tokens=True to accept the leak (encoders, analysis)."
            )

    @property
    def capacity_factor(self) -> float:
        c = self.config.capacity_factor
        return 2.0 if c is None else c

    handles_token_mask = True

    def route(self, x: Tensor, batch_shape: tuple[int, ...] | None, token_mask: Tensor | None = None) -> Routing:
        logits = self.logits(x)
        probs = logits.softmax(dim=-1)
        tokens, e = probs.shape
        if batch_shape is None or len(batch_shape) != 2:
            batch_shape = (1, tokens)
        b, s = batch_shape
        # padding scores below every real token's (probabilities are >= 0), and its picks are dropped below
        grid = (probs if token_mask is None else probs.masked_fill(~token_mask[:, None], -1.0)).view(b, s, e)
        if self.config.expert_choice_causal:
            # (S, E, B): at each position, experts choose among the batch.
            scores = grid.permute(1, 2, 0)
            group = b
        else:
            # (B, E, S): in each sequence, experts choose among its positions.
            scores = grid.permute(0, 2, 1)
            group = s
        if token_mask is None:
            capacity = min(group, max(1, ceil_tokens(group * self.capacity_factor / e)))
            group_caps = None
        else:  # each group's capacity counts its real tokens only, so padding never changes a choice
            real = token_mask.view(b, s).sum(dim=0 if self.config.expert_choice_causal else 1)  # (G,)
            group_caps = ceil_tokens_tensor(real.double() * self.capacity_factor / e).clamp_min(1).minimum(real)
            capacity = int(group_caps.max()) if group_caps.numel() else 0
        weight, choice = scores.topk(capacity, dim=-1)  # (G, E, C)
        outer = torch.arange(scores.shape[0], device=x.device).view(-1, 1, 1)
        if self.config.expert_choice_causal:
            token = choice * s + outer  # choice is a batch row, outer a position
        else:
            token = outer * s + choice  # outer is a batch row, choice a position
        expert = torch.arange(e, device=x.device).view(1, -1, 1).expand_as(token)
        token_index, expert_index, weight = token.reshape(-1), expert.reshape(-1), weight.reshape(-1)
        if group_caps is not None:  # ranks beyond a group's own capacity (padding scores lowest, so never picked)
            rank = torch.arange(capacity, device=x.device).view(1, 1, -1)
            within = (rank < group_caps.view(-1, 1, 1)).expand_as(token).reshape(-1)
            token_index, expert_index, weight = token_index[within], expert_index[within], weight[within]
        chosen = torch.zeros(tokens, dtype=torch.bool, device=x.device)
        chosen[token_index] = True
        if token_mask is not None:
            chosen |= ~token_mask  # padding is not a dropped token
        losses: dict[str, Tensor] = {}
        self._z_loss(logits if token_mask is None else logits[token_mask], losses)
        return Routing(
            token_index=token_index,
            expert_index=expert_index,
            weight=weight,
            logits=logits,
            probs=probs,
            num_experts=e,
            slots=None,
            dropped=~chosen,
            aux_losses=losses,
            valid=token_mask,
        )


@register_router("sigmoid_bias")
class SigmoidBiasRouter(Router):
    """Auxiliary-loss-free balancing (DeepSeek-V3; Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing").

    s = sigmoid(W x) (float32). Experts are *selected* by top-k of s + b, where b (E,) is a
    float32 buffer not trained by gradient; the combine weights come from s alone, renormalised
    over the k selected when ``normalize_weights``. In training the router counts how many tokens
    each expert received; :meth:`update_bias` (call it after each optimiser step, e.g. through
    :func:`moeforge.moe.layer.update_router_biases`) moves b_i by -gamma if expert i received more
    than the mean load and +gamma if less (gamma = ``bias_update_rate``, 1e-3 by default). Under
    gradient checkpointing the forward recomputed in the backward counts its tokens again: every
    expert's count doubles, which leaves the sign of each step, and so the update, unchanged.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.register_buffer("bias", torch.zeros(config.num_experts, dtype=torch.float32))
        self.register_buffer("pending_load", torch.zeros(config.num_experts, dtype=torch.float32), persistent=False)

    def route(self, x: Tensor, batch_shape: tuple[int, ...] | None) -> Routing:
        logits = self.logits(x)
        scores = torch.sigmoid(logits)
        _, index = (scores.detach() + self.bias.float()).topk(self.top_k, dim=-1)
        weight = scores.gather(1, index)
        if self.config.normalize_weights:
            weight = weight / weight.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        losses: dict[str, Tensor] = {}
        if self.training:
            with torch.no_grad():
                self.pending_load += expert_counts(index, self.num_experts).float()
            if self.aux_loss_coef > 0:
                normed = scores / scores.sum(dim=-1, keepdim=True)
                losses["balance_loss"] = self.aux_loss_coef * load_balancing_loss(normed, index, self.num_experts)
        self._z_loss(logits, losses)
        return token_choice(index, weight, logits=logits, probs=scores, num_experts=self.num_experts, aux_losses=losses)

    _FLOAT32_BUFFERS = ("bias", "pending_load")

    def _apply(self, fn, recurse=True):
        """Module casts (``.to(torch.bfloat16)``, ``.half()``) move the bias and the load counts but
        keep them float32: a +-gamma step of 1e-3 is lost in bf16 once |b| >= 0.5, and fp16 counts
        overflow at 65,504 tokens per expert."""
        saved = {name: self._buffers[name] for name in self._FLOAT32_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in saved.items():
            new = self._buffers[name]
            if new.dtype != torch.float32:
                self._buffers[name] = old.to(device=new.device, dtype=torch.float32)
        return self

    @torch.no_grad()
    def update_bias(self) -> None:
        """Nudge each expert's selection bias toward balance using the load seen since the last call."""
        load = self.pending_load
        if load.sum() == 0:
            return
        self.bias += self.config.bias_update_rate * torch.sign(load.mean() - load)
        load.zero_()
