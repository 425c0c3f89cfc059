"""Shared types of the expert construction methods, and the method registry.

A method turns one dense SwiGLU FFN, y = W_down (silu(W_gate x) * (W_up x)), into routed experts
(and optionally shared experts). Split methods give expert i the neuron set N_i: it keeps rows
N_i of W_gate and W_up and columns N_i of W_down (LLaMA-MoE, Zhu et al. 2024, sec. 2.2), so for
any partition sum_i E_i(x) equals the dense output exactly. Upcycling copies whole FFNs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ...errors import unknown_name
from ..config import ConvertConfig


@dataclass
class DenseFFN:
    """One dense SwiGLU block in ``nn.Linear`` orientation, in its stored dtype.

    gate: (I, H), up: (I, H), down: (H, I).
    """

    gate: Tensor
    up: Tensor
    down: Tensor

    @property
    def intermediate_size(self) -> int:
        return self.gate.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.gate.shape[1]

    def activations(self, x: Tensor) -> Tensor:
        """(T, H) -> (T, I) float32 input of down_proj, silu(x W_gate^T) * (x W_up^T)."""
        x = x.float()
        return torch.nn.functional.silu(x @ self.gate.float().T) * (x @ self.up.float().T)

    def __call__(self, x: Tensor) -> Tensor:
        return self.activations(x) @ self.down.float().T


@dataclass
class LayerCalibration:
    """Calibration data of one layer, float32, computed on the dense model's trajectory.

    x: (T, H) inputs of the FFN (after post_attention_layernorm).
    y: (T, H) the dense FFN's outputs.
    importance: (C, I) per data-cluster neuron importance |a . dL/da| (importance method only).
    labels: (T,) long, the expert whose --expert-data each token came from (--gate-init domain only).
    """

    x: Tensor
    y: Tensor
    importance: Tensor | None = None
    labels: Tensor | None = None
    _act: Tensor | None = None

    def activations(self, ffn: DenseFFN) -> Tensor:
        """(T, I) float32 dense activations (input of down_proj), computed once."""
        if self._act is None:
            self._act = ffn.activations(self.x)
        return self._act


@dataclass
class LayerContext:
    """What a method may use besides the weights: the layer index, the options, randomness, data,
    and for ``merge`` this layer's FFN of every expert model (in expert order)."""

    index: int
    config: ConvertConfig
    generator: torch.Generator
    calib: LayerCalibration | None = None
    expert_ffns: list[DenseFFN] | None = None


@dataclass
class LayerExperts:
    """Constructed experts of one layer, in the dense weights' dtype.

    gate_up: (E, 2m, H), gate rows first; down: (E, H, m).
    shared_gate, shared_up: (S*m_s, H) and shared_down: (H, S*m_s), or None without shared experts.
    groups: for split methods, the neuron indices (into the dense FFN) of each routed expert.
    shared_neurons: for split methods, the neuron indices of the shared experts.
    router_groups: (E,) virtual group of each expert; experts in one group share a router row
        at random initialisation (granular upcycling). None means every expert its own group.
    default_scale: the output scale ``--rescale auto`` uses for this method.
    """

    gate_up: Tensor
    down: Tensor
    shared_gate: Tensor | None = None
    shared_up: Tensor | None = None
    shared_down: Tensor | None = None
    groups: list[Tensor] | None = None
    shared_neurons: Tensor | None = None
    router_groups: Tensor | None = None
    default_scale: float = 1.0
    info: dict = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    @property
    def expert_size(self) -> int:
        return self.down.shape[2]

    @property
    def has_shared(self) -> bool:
        return self.shared_down is not None

    def expert_outputs(self, x: Tensor) -> Tensor:
        """(T, H) -> (T, E, H) float32 output of every routed expert (no weighting)."""
        x = x.float()
        m = self.expert_size
        outs = []
        for e in range(self.num_experts):
            gu = self.gate_up[e].float()
            a = torch.nn.functional.silu(x @ gu[:m].T) * (x @ gu[m:].T)
            outs.append(a @ self.down[e].float().T)
        return torch.stack(outs, dim=1)

    def shared_output(self, x: Tensor) -> Tensor | None:
        """(T, H) -> (T, H) float32 output of the shared experts, or None."""
        if not self.has_shared:
            return None
        x = x.float()
        a = torch.nn.functional.silu(x @ self.shared_gate.float().T) * (x @ self.shared_up.float().T)
        return a @ self.shared_down.float().T


def experts_from_groups(ffn: DenseFFN, groups: list[Tensor], shared: list[Tensor] | None = None) -> LayerExperts:
    """Slice a dense FFN into experts: expert i keeps gate/up rows and down columns ``groups[i]``.

    ``shared`` neuron groups are concatenated into one always-on MLP (S experts of width m are
    exactly one MLP of width S*m).
    """
    gate_up = torch.stack([torch.cat([ffn.gate[g], ffn.up[g]], dim=0) for g in groups])
    down = torch.stack([ffn.down[:, g] for g in groups])
    out = LayerExperts(gate_up=gate_up, down=down, groups=[g.clone() for g in groups])
    if shared:
        idx = torch.cat(shared)
        out.shared_gate = ffn.gate[idx].clone()
        out.shared_up = ffn.up[idx].clone()
        out.shared_down = ffn.down[:, idx].clone()
        out.shared_neurons = idx
    return out


@dataclass(frozen=True)
class Method:
    """A registered construction method.

    build: (ffn, ctx) -> LayerExperts.
    needs_calibration: the method reads ``ctx.calib`` (FFN inputs on calibration tokens).
    needs_importance: the method reads ``ctx.calib.importance`` (a backward pass over the model).
    """

    name: str
    build: Callable[[DenseFFN, LayerContext], LayerExperts]
    needs_calibration: bool = False
    needs_importance: bool = False
    splits: bool = True


METHODS: dict[str, Method] = {}


def register_method(name: str, *, needs_calibration: bool = False, needs_importance: bool = False, splits: bool = True):
    def wrap(fn: Callable[[DenseFFN, LayerContext], LayerExperts]):
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered")
        METHODS[name] = Method(name, fn, needs_calibration or needs_importance, needs_importance, splits)
        return fn

    return wrap


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise unknown_name("conversion method", name, METHODS)
    return METHODS[name]
