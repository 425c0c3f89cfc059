"""Configuration of one feed-forward MoE layer, validated at construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import MoeforgeError, closest, require
from ..utils.validation import check_field_types

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


@dataclass
class MoEConfig:
    """Shape and routing of a feed-forward Mixture-of-Experts layer.

    Router-specific fields are ignored by routers that do not use them; ``None`` means the
    router's published default (see each router's docstring in :mod:`moeforge.moe.routers`).
    """

    hidden_size: int
    """Model width H: the layer maps (tokens, H) -> (tokens, H)."""
    expert_size: int
    """Intermediate width of one routed expert."""
    num_experts: int
    """Number of routed experts E."""
    top_k: int = 2
    """Experts per token for token-choice routers (Switch forces 1)."""
    router: str = "topk"
    """Router name from ``moeforge.moe.ROUTERS``: topk, noisy_topk, switch, expert_choice, sigmoid_bias."""
    glu: bool = True
    """SwiGLU experts (gate, up, down) when true; a plain two-matrix MLP (up, down) otherwise."""
    activation: str = "silu"
    """Expert nonlinearity: silu, gelu, gelu_tanh or relu."""
    num_shared_experts: int = 0
    """Always-on shared experts added to every token's output (LLaMA-MoE residual / DeepSeek shared)."""
    shared_expert_size: int | None = None
    """Intermediate width of each shared expert; defaults to ``expert_size``."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output per token by sigmoid(x . w), w a learned (1, H) row
    (Qwen2-MoE's ``shared_expert_gate``); false adds it ungated (LLaMA-MoE, DeepSeek)."""
    normalize_weights: bool = True
    """Renormalise the k selected weights to sum to one (Mixtral); false keeps raw softmax mass (Qwen-MoE)."""
    output_scale: float = 1.0
    """Constant multiplier on the routed experts' sum (LLaMA-MoE rescaling, E/k for split experts)."""
    capacity_factor: float | None = None
    """Switch: capacity = tokens/E x factor (default 1.25). Expert choice: c in n*c/E (default 2.0)."""
    jitter_eps: float | None = None
    """Switch: multiplicative jitter U(1-eps, 1+eps) of the router's input in training (default 0.01)."""
    input_jitter: float = 0.0
    """Any router: multiply the whole layer input (router, routed and shared experts) by
    U(1-eps, 1+eps) in training (Mixtral's ``router_jitter_noise``); 0 disables it."""
    aux_loss_coef: float | None = None
    """Load-balancing loss weight per MoE layer (defaults: switch 1e-2, topk 1e-3, noisy_topk CV^2
    weight 1e-2, sigmoid_bias 0: aux-loss-free; a positive value there adds the Switch-style
    alpha * E * sum_i f_i P_i over the whole batch on the normalised sigmoid scores, not DeepSeek-V3's
    per-sequence complementary loss with its E/(k T) scaling of f); the model sums the layers' losses."""
    z_loss_coef: float = 0.0
    """Router z-loss weight in training (ST-MoE uses 1e-3); 0 disables it."""
    noise_floor: float = 1e-2
    """noisy_topk: the constant added to softplus(x W_noise) for the noise std (LLaMA-MoE)."""
    router_mlp: bool = False
    """noisy_topk: LLaMA-MoE's gate network Linear(H,E) -> tanh -> Linear(E,E) instead of a linear gate."""
    router_init_std: float | None = None
    """Std of the router weight init; default: truncated normal sqrt(0.1/H) for switch, 0.02 otherwise."""
    expert_dropout: float = 0.0
    """Dropout inside experts on the intermediate activation (Switch: 0.4 when fine-tuning)."""
    bias_update_rate: float = 1e-3
    """sigmoid_bias: the step gamma by which each expert's selection bias moves per update."""
    expert_choice_causal: bool = False
    """expert_choice: choose tokens across the batch at each position (causal-safe) instead of across the sequence."""
    allow_future_tokens: bool = False
    """expert_choice: accept that sequence-level expert choice looks at future tokens; switch: the
    same for ``drop_policy="probability"`` (encoders, analysis)."""
    drop_policy: str = "position"
    """switch: which overflow tokens drop first: "position" (the last of the flattened batch, row by
    row; transformers ranks within each sequence against a per-sequence capacity) or
    "probability" (lowest router probability, flaxformer; in a decoder an earlier token's drop then
    depends on later tokens, so it needs ``allow_future_tokens``)."""
    eval_capacity_factor: float | None = None
    """switch in eval mode: None routes every token (no capacity, so a decoder's output does not
    depend on the rest of the batch or on whether a KV cache is used); a number caps each expert
    at tokens/E x it, as ``capacity_factor`` does in training (Switch's eval capacity factor)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata carried with the config (e.g. how the experts were built)."""

    def __post_init__(self) -> None:
        from .routers import ROUTERS  # late import: routers import this module

        check_field_types(self)
        _check_finite(self)

        for name in ("hidden_size", "expert_size", "num_experts", "top_k"):
            value = getattr(self, name)
            require(
                isinstance(value, int) and value > 0,
                f"MoEConfig.{name} must be a positive integer, got {value!r}.",
            )
        if self.router not in ROUTERS:
            known = ", ".join(sorted(ROUTERS))
            raise MoeforgeError(
                f"unknown router {self.router!r}.{closest(self.router, ROUTERS)} Known routers: {known}."
            )
        if self.router == "switch" and self.top_k != 1:
            raise MoeforgeError(
                f"the switch router routes each token to exactly one expert, got top_k={self.top_k}; "
                "set top_k=1 or use router='topk'."
            )
        if self.router != "expert_choice":
            require(
                self.top_k <= self.num_experts,
                f"top_k={self.top_k} is greater than num_experts={self.num_experts}; "
                f"choose top_k <= {self.num_experts} or add experts.",
            )
        if self.capacity_factor is not None:
            require(
                self.capacity_factor > 0,
                f"capacity_factor must be > 0, got {self.capacity_factor}; "
                "Switch Transformer trains with 1.0-1.25, expert choice with 2.0.",
            )
        require(
            self.activation in ACTIVATIONS,
            f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}.",
        )
        require(
            self.num_shared_experts >= 0,
            f"num_shared_experts must be >= 0, got {self.num_shared_experts}.",
        )
        require(
            not self.shared_expert_gate or self.num_shared_experts > 0,
            "shared_expert_gate needs shared experts; set num_shared_experts >= 1 or turn the gate off.",
        )
        if self.shared_expert_size is not None:
            require(
                self.shared_expert_size > 0,
                f"shared_expert_size must be > 0, got {self.shared_expert_size}.",
            )
        require(
            0.0 <= self.expert_dropout < 1.0,
            f"expert_dropout must be in [0, 1), got {self.expert_dropout}.",
        )
        if self.jitter_eps is not None:
            require(0.0 <= self.jitter_eps < 1.0, f"jitter_eps must be in [0, 1), got {self.jitter_eps}.")
        require(0.0 <= self.input_jitter < 1.0, f"input_jitter must be in [0, 1), got {self.input_jitter}.")
        require(
            self.drop_policy in ("position", "probability"),
            f"drop_policy must be 'position' or 'probability', got {self.drop_policy!r}.",
        )
        if self.router == "switch" and self.drop_policy == "probability" and not self.allow_future_tokens:
            raise MoeforgeError(
                "drop_policy='probability' decides which tokens overflow an expert by comparing router "
                "probabilities across the whole batch, so an earlier token's output depends on later tokens "
                "(a leak in a decoder). Use drop_policy='position', or set allow_future_tokens=True to accept "
                "the leak (encoders, analysis)."
            )
        if self.eval_capacity_factor is not None:
            require(self.eval_capacity_factor > 0, f"eval_capacity_factor must be > 0, got {self.eval_capacity_factor}.")
        require(self.z_loss_coef >= 0, f"z_loss_coef must be >= 0, got {self.z_loss_coef}.")
        require(self.noise_floor >= 0, f"noise_floor must be >= 0, got {self.noise_floor}.")
        require(self.bias_update_rate >= 0, f"bias_update_rate must be >= 0 (a negative step pushes load away from "
                                            f"balance), got {self.bias_update_rate}.")
        if self.router_init_std is not None:
            require(self.router_init_std >= 0, f"router_init_std must be >= 0, got {self.router_init_std}.")
        if self.aux_loss_coef is not None:
            require(self.aux_loss_coef >= 0, f"aux_loss_coef must be >= 0, got {self.aux_loss_coef}.")
        ROUTERS[self.router].validate(self)

    @property
    def shared_size(self) -> int:
        """Intermediate width of one shared expert."""
        return self.shared_expert_size or self.expert_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoEConfig:
        """Build from a dict, refusing unknown keys with the closest valid one."""
        names = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in names:
                raise MoeforgeError(f"unknown MoE setting {key!r}.{closest(key, names)}")
        required = sorted(f.name for f in dataclasses.fields(cls)
                          if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        missing = [name for name in required if name not in data]
        if missing:
            raise MoeforgeError(f"the MoE settings lack {', '.join(missing)}, which have no default.")
        return cls(**data)

    def replace(self, **changes: Any) -> MoEConfig:
        return dataclasses.replace(self, **changes)


def _check_finite(config: MoEConfig) -> None:
    """Refuse NaN and infinite numbers in ``config``'s float fields: comparisons such as
    ``capacity_factor > 0`` let ``inf`` through (an OverflowError at the first forward), and
    ``output_scale``, which has no range, would turn every output into NaN."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            default = "the router's default" if f.default is None else repr(f.default)
            raise MoeforgeError(
                f"MoEConfig.{f.name} must be a finite number, got {value!r}; set a finite value or leave it out "
                f"for its default ({default})."
            )
