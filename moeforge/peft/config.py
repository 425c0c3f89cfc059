"""Configs of the parameter-efficient adapters, validated at construction.

Four methods share two code paths (so comparisons are fair):

* (IA)^3 (Liu et al. 2022, arXiv 2205.05638) and MoV (Zadouri et al. 2023, arXiv 2309.05444,
  sec. 2.2): learned scaling vectors on attention keys and values and on the FFN intermediate
  activation. MoV keeps E vectors per module and mixes them with a router; (IA)^3 is the
  one-vector case without a router.
* LoRA (Hu et al. 2021, arXiv 2106.09685) and MoLoRA (Zadouri et al. 2023): a low-rank update
  (alpha/r) B A x added to a frozen linear layer; MoLoRA keeps E (A, B) pairs per module and
  mixes their outputs with a router; LoRA is the one-expert case without a router.

``target_modules`` follows the PEFT convention: a list of names, each matching a module whose
full dotted name equals it or ends with ``"." + name``; or one string, a regular expression the
full name must match entirely. ``None`` picks the defaults of the model family (LLaMA family or
T5, see :mod:`moeforge.peft.targets`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import MoeforgeError, closest, require
from ..utils.validation import check_field_types

#: router inputs each method accepts (``router_input``).
MOV_ROUTER_INPUTS = ("activation", "block", "sentence")
MOLORA_ROUTER_INPUTS = ("input", "sentence")


def _check_targets(owner: str, name: str, value: Any, *, allow_empty: bool = False) -> None:
    if value is None or isinstance(value, str):
        require(value is None or value.strip() != "", f"{owner}.{name} is an empty string; give module names or a regex.")
        return
    require(
        isinstance(value, (list, tuple)) and (allow_empty or len(value) > 0) and all(isinstance(v, str) and v for v in value),
        f"{owner}.{name} must be a non-empty list of module names (or one regex string), got {value!r}.",
    )


def _positive_int(owner: str, name: str, value: Any) -> None:
    require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        f"{owner}.{name} must be a positive integer, got {value!r}.",
    )


@dataclass
class AdapterConfig:
    """Fields every adapter method shares. Use one of the four subclasses."""

    method: ClassVar[str] = "base"
    has_router: ClassVar[bool] = True
    router_inputs: ClassVar[tuple[str, ...]] = ()

    num_experts: int = 10
    """Experts E per adapted module (1 for the single-adapter baselines)."""
    top_k: int | None = None
    """None: soft merging (softmax-weighted sum over all experts, the paper's default). k: keep the k
    most probable experts per token with their softmax weights, not renormalised (as the authors'
    code); MoV gives the weight the kept experts leave (1 - sum of the k) to the identity vector, so a
    top-k MoV starts equal to the base model like every other adapter."""
    target_modules: list[str] | str | None = None
    """Modules to adapt (list of names / suffixes, or one full-match regex); None: family defaults."""
    router_init_std: float = 0.02
    """Std of the router weight init, N(0, std^2), bias-free, float32 (paper's code: 0.02)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata stored with the adapter (e.g. what it was trained on)."""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_field_types(self, skip=("target_modules", "feedforward_modules"), prefix=f"{owner}.")
        _positive_int(owner, "num_experts", self.num_experts)
        if not self.has_router:
            require(
                self.num_experts == 1,
                f"{owner} is a single adapter (num_experts must be 1, got {self.num_experts}); "
                f"use {'MoVConfig' if self.method == 'ia3' else 'MoLoRAConfig'}(num_experts={self.num_experts}) for a mixture.",
            )
            require(self.top_k is None, f"{owner} has no router, so top_k must be None, got {self.top_k!r}.")
            router_input = getattr(self, "router_input", None)
            require(
                router_input is None or router_input == self.router_inputs[0],
                f"{owner} has no router, so router_input must stay {self.router_inputs[0]!r}, got {router_input!r}.",
            )
        if self.top_k is not None:
            _positive_int(owner, "top_k", self.top_k)
            require(
                self.top_k <= self.num_experts,
                f"{owner}.top_k={self.top_k} is greater than num_experts={self.num_experts}; "
                f"choose top_k <= {self.num_experts}, or None for soft merging.",
            )
        _check_targets(owner, "target_modules", self.target_modules)
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        require(
            isinstance(self.router_init_std, (int, float)) and 0 < self.router_init_std < math.inf,
            f"{owner}.router_init_std must be a finite number > 0, got {self.router_init_std!r} (paper's code: 0.02).",
        )
        router_input = getattr(self, "router_input", None)
        if router_input is not None:
            require(
                router_input in self.router_inputs,
                f"{owner}.router_input={router_input!r} is not one of {', '.join(self.router_inputs)}."
                f"{closest(str(router_input), self.router_inputs)}",
            )

    @property
    def uses_router(self) -> bool:
        """Whether the adapted modules carry a router (the mixtures do, even with one expert)."""
        return self.has_router

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def replace(self, **changes: Any) -> AdapterConfig:
        return dataclasses.replace(self, **changes)


@dataclass
class MoVConfig(AdapterConfig):
    """Mixture of (IA)^3 vectors (MoV; Zadouri et al. 2023, sec. 2.2, eq. 4).

    Per adapted module: E vectors l_i (initialised to ones) and a router W_g (E, d_router).
    Output: a * sum_i s_i l_i with s = softmax(W_g r), where a is the rescaled activation; with
    ``top_k``, a * (sum_{i in top-k} s_i l_i + (1 - sum_{i in top-k} s_i)), i.e. the unkept weight
    goes to the identity (all-ones) vector, so the model starts equal to the base (the paper's
    a * sum_{top-k} s_i l_i would start scaled by sum s_i < 1). Keys and values are rescaled per head: each head's slice of k (or v)
    is routed on its own with one router shared across heads, and each head has its own vectors.
    """

    method: ClassVar[str] = "mov"
    router_inputs: ClassVar[tuple[str, ...]] = MOV_ROUTER_INPUTS

    feedforward_modules: list[str] | str | None = None
    """Targets whose *input* is rescaled (the FFN intermediate activation, e.g. ``down_proj``); the
    other targets have their output rescaled (keys, values). None: family defaults; []: none."""
    router_input: str = "activation"
    """What the router reads: "activation" (the rescaled activation, per head for k/v: the paper's
    code), "block" (the input of the block: the projection's input for k/v, the FFN block's input
    for the intermediate activation), or "sentence" (a frozen mean-pooled embedding of the text:
    the prefix mean in decoders; in packed training blocks it spans the block, not one document)."""
    head_dim: int | None = None
    """Head size used to split keys/values per head; None reads it from the model config."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_targets(type(self).__name__, "feedforward_modules", self.feedforward_modules, allow_empty=True)
        if isinstance(self.feedforward_modules, tuple):
            self.feedforward_modules = list(self.feedforward_modules)
        if self.head_dim is not None:
            _positive_int(type(self).__name__, "head_dim", self.head_dim)


@dataclass
class IA3Config(MoVConfig):
    """(IA)^3 (Liu et al. 2022): one learned vector per module, no router. MoV's code path with E = 1."""

    method: ClassVar[str] = "ia3"
    has_router: ClassVar[bool] = False

    num_experts: int = 1


@dataclass
class MoLoRAConfig(AdapterConfig):
    """Mixture of LoRA experts (MoLoRA; Zadouri et al. 2023, sec. 2.2).

    Per adapted linear W (out, in): E pairs A_i (r, in) ~ N(0, 0.02^2), B_i (out, r) = 0, and a
    router reading the module's input x. Output: W x + (alpha / r) sum_i s_i B_i A_i x. All experts
    are computed with two batched matmuls (no Python loop over experts).
    """

    method: ClassVar[str] = "molora"
    router_inputs: ClassVar[tuple[str, ...]] = MOLORA_ROUTER_INPUTS

    rank: int = 4
    """LoRA rank r of each expert (paper: 4)."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / rank (paper: 16)."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training (0 disables it)."""
    init_std: float = 0.02
    """Std of A's init, N(0, std^2) (paper's code: 0.02); B starts at zero."""
    router_input: str = "input"
    """"input" (the module's input, per token) or "sentence" (a frozen mean-pooled embedding)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        _positive_int(owner, "rank", self.rank)
        require(
            isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and 0 < self.alpha < math.inf,
            f"{owner}.alpha must be a finite number > 0, got {self.alpha!r}; the update is scaled by alpha/rank (paper: alpha=16, rank=4).",
        )
        require(
            isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
            f"{owner}.dropout must be in [0, 1), got {self.dropout!r}.",
        )
        require(
            isinstance(self.init_std, (int, float)) and 0 < self.init_std < math.inf,
            f"{owner}.init_std must be a finite number > 0, got {self.init_std!r} (paper's code: 0.02).",
        )

    @property
    def scaling(self) -> float:
        return float(self.alpha) / self.rank


@dataclass
class LoRAConfig(MoLoRAConfig):
    """LoRA (Hu et al. 2021): one (A, B) pair per module, no router. MoLoRA's code path with E = 1."""

    method: ClassVar[str] = "lora"
    has_router: ClassVar[bool] = False

    num_experts: int = 1


#: method name -> config class
PEFT_CONFIGS: dict[str, type[AdapterConfig]] = {
    "mov": MoVConfig,
    "ia3": IA3Config,
    "molora": MoLoRAConfig,
    "lora": LoRAConfig,
}


def config_from_dict(data: dict[str, Any], *, where: str = "peft config") -> AdapterConfig:
    """Build a config from ``{"method": name, **fields}``; unknown methods and keys are refused.

    An unknown key names the closest valid key of that method, so a typo in a YAML ``peft:``
    section reads as ``unknown key 'num_expert' in peft config. Did you mean 'num_experts'?``.
    """
    if not isinstance(data, dict):
        raise MoeforgeError(f"{where} must be a mapping with a 'method' key, got {type(data).__name__}.")
    data = dict(data)
    method = data.pop("method", None)
    if method is None:
        raise MoeforgeError(f"{where} has no 'method'; choose one of {', '.join(PEFT_CONFIGS)}.")
    if method not in PEFT_CONFIGS:
        raise MoeforgeError(
            f"unknown PEFT method {method!r} in {where}.{closest(str(method), PEFT_CONFIGS)} "
            f"Known methods: {', '.join(PEFT_CONFIGS)}."
        )
    cls = PEFT_CONFIGS[method]
    names = cls.field_names()
    for key in data:
        if key not in names:
            raise MoeforgeError(
                f"unknown key {key!r} in {where} (method {method}).{closest(key, names + ['method'])} "
                f"Valid keys: method, {', '.join(names)}."
            )
    try:
        return cls(**data)
    except TypeError as err:  # e.g. a wrong value type deep in dataclasses
        raise MoeforgeError(f"bad {where}: {err}") from None
    except MoeforgeError as err:
        # the field checks name the Python class ("MoVConfig.num_experts ..."); a YAML or JSON user
        # wrote a section, so name that and the method instead
        raise MoeforgeError(f"{where} (method {method}): {str(err).replace(f'{cls.__name__}.', '')}") from None
