"""The export side of the formats: what a converted model is, and the exporter interface.

A converted model is described by an :class:`ExportSpec` (the converted model's
:class:`~moeforge.models.MoeforgeConfig`, the tensor dtype, which attention biases the dense
model had) and produced layer by layer as :class:`MoELayerWeights` / :class:`DenseLayerWeights`.
Each :class:`Exporter` says whether it represents the spec exactly, plans every tensor it will
write (key, shape, dtype, in write order) so the streaming writer can lay out shards before any
weight exists, maps each layer to its own keys, and writes its ``config.json``.

Attention, norms and embeddings use LLaMA's keys in every format (``model.layers.{i}.self_attn.
{q,k,v,o}_proj.{weight,bias}``, ``input_layernorm``, ``post_attention_layernorm``,
``model.embed_tokens``, ``model.norm``, ``lm_head``); only the feed-forward keys differ.
"""

from __future__ import annotations

import dataclasses

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..convert.streaming import PlanEntry
from ..models.configuration_moeforge import MoeforgeConfig

ATTN = "model.layers.{i}.self_attn.{p}_proj.{w}"
IN_NORM = "model.layers.{i}.input_layernorm.weight"
POST_NORM = "model.layers.{i}.post_attention_layernorm.weight"


@dataclass
class MoELayerWeights:
    """One converted feed-forward block.

    router: (E, H) float32 router weight; router_extra: other router state (``noise``, ``bias``...).
    gate_up: (E, 2m, H), gate rows first; down: (E, H, m).
    shared_gate, shared_up: (S*m_s, H); shared_down: (H, S*m_s); None without shared experts.
    output_scale: multiplier of the routed sum (1.0 once folded into ``down``).
    """

    router: Tensor
    gate_up: Tensor
    down: Tensor
    shared_gate: Tensor | None = None
    shared_up: Tensor | None = None
    shared_down: Tensor | None = None
    output_scale: float = 1.0
    router_extra: dict[str, Tensor] = field(default_factory=dict)

    def folded(self) -> MoELayerWeights:
        """The same function with ``output_scale`` multiplied into ``down``, in float32 (the export's
        cast to its dtype is then the only rounding, also for a bfloat16 source written as float32)."""
        if self.output_scale == 1.0:
            return self
        down = self.down.float() * self.output_scale
        return MoELayerWeights(self.router, self.gate_up, down, self.shared_gate, self.shared_up, self.shared_down, 1.0,
                               dict(self.router_extra))


#: MoE settings an exported checkpoint need not record: the initial router std (the weights are
#: written), the output scale (folded into the weights), the conversion's record, and the
#: decoder-safety choice expert choice makes (checked by the formats' router test)
_NEEDS_NO_FIELD = frozenset({"router_init_std", "output_scale", "extra", "expert_choice_causal", "allow_future_tokens"})


@dataclass
class DenseLayerWeights:
    """A feed-forward block left dense: gate/up (I, H), down (H, I)."""

    gate: Tensor
    up: Tensor
    down: Tensor


@dataclass
class ExportSpec:
    """What is being exported.

    config: the converted model's MoeforgeConfig (per-layer output scales are only known at the
        end and are passed to :meth:`Exporter.config_dict` separately).
    dtype: dtype of every tensor except moeforge's float32 router.
    qkv_bias / o_bias: whether attention projections carry biases (Qwen2: q, k, v only).
    router_state: router parameter/buffer name -> shape (from the router class), ``weight`` included.
    """

    config: MoeforgeConfig
    dtype: torch.dtype
    qkv_bias: bool = False
    o_bias: bool = False
    router_state: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def moe(self) -> dict[str, Any]:
        return self.config.moe

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def grouped_mm_problem(self) -> str | None:
        """Why transformers' default experts implementation (``grouped_mm``) cannot run these
        experts, or None: it needs expert rows of a multiple of 16 bytes, in the dtype written and
        in float32 (the usual ways to open a checkpoint)."""
        from ..moe.kernels import rows_aligned

        for dtype in dict.fromkeys((self.dtype, torch.float32)):
            size = torch.empty((), dtype=dtype).element_size()
            for what, width in (("expert width", self.expert_size), ("hidden size", self.hidden)):
                if not rows_aligned(width, dtype):
                    name = str(dtype).removeprefix("torch.")
                    return (f"transformers runs its experts with grouped_mm, which needs rows of a multiple of 16 "
                            f"bytes, and the {what} {width} in {name} is {width * size} bytes (choose --experts so "
                            f"that the width is a multiple of {16 // min(size, 4) if what == 'expert width' else 8})")
        return None

    def unheld_settings(self, held: set[str]) -> list[str]:
        """MoE settings with a non-default value that a format holding ``held`` has no field for
        (z-loss, expert dropout, router options...): the export would silently drop them. Settings
        that only shape the initial weights, and the output scale (folded), need no field."""
        from ..moe.config import MoEConfig

        defaults = {f.name: f.default for f in dataclasses.fields(MoEConfig) if f.default is not dataclasses.MISSING}
        return sorted(k for k, v in self.moe.items()
                      if k in defaults and k not in held and k not in _NEEDS_NO_FIELD and v != defaults[k])

    def hf_aux_loss_coef(self) -> float:
        """transformers' ``router_aux_loss_coef`` with this model's balance-loss strength: moeforge
        sums one loss per MoE layer, transformers computes one loss over all layers' tokens, so
        its coefficient is ours times the number of MoE layers (see :func:`moeforge_aux_loss_coef`)."""
        coef = self.moe.get("aux_loss_coef")
        layers = sum(self.is_moe(i) for i in range(self.num_layers))
        return (1e-3 if coef is None else float(coef)) * max(1, layers)

    def is_moe(self, i: int) -> bool:
        return self.config.is_moe_layer(i)

    @property
    def num_experts(self) -> int:
        return self.moe["num_experts"]

    @property
    def expert_size(self) -> int:
        return self.moe["expert_size"]

    @property
    def shared_width(self) -> int:
        s = self.moe.get("num_shared_experts", 0)
        return s * (self.moe.get("shared_expert_size") or self.expert_size)

    @property
    def hidden(self) -> int:
        return self.config.hidden_size

    @property
    def tied(self) -> bool:
        return bool(self.config.tie_word_embeddings)


class Exporter(ABC):
    """One export format. Subclasses set ``name`` and ``fold_scale`` and implement the FFN mapping."""

    name: str = ""
    #: stock formats have no output scale: it is multiplied into down_proj before export
    fold_scale: bool = True
    #: whether the written directory opens with plain transformers (no moeforge import)
    plain_transformers: bool = True

    @abstractmethod
    def unsupported(self, spec: ExportSpec) -> str | None:
        """None when this format represents the converted model exactly, else the reason."""

    # ------------------------------------------------------------------ attention (shared)
    def attention_biases(self, spec: ExportSpec) -> tuple[bool, bool]:
        """(q/k/v bias written, o bias written) in this format."""
        return spec.qkv_bias, spec.o_bias

    def attention_plan(self, spec: ExportSpec, i: int) -> list[PlanEntry]:
        c = spec.config
        hd = c.head_dim
        qkv_b, o_b = self.attention_biases(spec)
        dims = {"q": c.num_attention_heads * hd, "k": c.num_key_value_heads * hd, "v": c.num_key_value_heads * hd}
        out = [PlanEntry(IN_NORM.format(i=i), (c.hidden_size,), spec.dtype)]
        for p, d in dims.items():
            out.append(PlanEntry(ATTN.format(i=i, p=p, w="weight"), (d, c.hidden_size), spec.dtype))
            if qkv_b:
                out.append(PlanEntry(ATTN.format(i=i, p=p, w="bias"), (d,), spec.dtype))
        out.append(PlanEntry(ATTN.format(i=i, p="o", w="weight"), (c.hidden_size, c.num_attention_heads * hd), spec.dtype))
        if o_b:
            out.append(PlanEntry(ATTN.format(i=i, p="o", w="bias"), (c.hidden_size,), spec.dtype))
        out.append(PlanEntry(POST_NORM.format(i=i), (c.hidden_size,), spec.dtype))
        return out

    def global_plan(self, spec: ExportSpec) -> tuple[list[PlanEntry], list[PlanEntry]]:
        """(entries before the layers, entries after them)."""
        c = spec.config
        pre = [PlanEntry("model.embed_tokens.weight", (c.vocab_size, c.hidden_size), spec.dtype)]
        post = [PlanEntry("model.norm.weight", (c.hidden_size,), spec.dtype)]
        if not spec.tied:
            post.append(PlanEntry("lm_head.weight", (c.vocab_size, c.hidden_size), spec.dtype))
        return pre, post

    # ------------------------------------------------------------------ feed-forward (per format)
    @abstractmethod
    def ffn_plan(self, spec: ExportSpec, i: int) -> list[PlanEntry]:
        """The feed-forward entries of layer ``i`` in write order."""

    @abstractmethod
    def ffn_tensors(self, spec: ExportSpec, i: int, weights: MoELayerWeights | DenseLayerWeights) -> list[tuple[str, Tensor]]:
        """Layer ``i``'s feed-forward tensors under this format's keys, in :meth:`ffn_plan` order."""

    def plan(self, spec: ExportSpec) -> list[PlanEntry]:
        pre, post = self.global_plan(spec)
        layers = [e for i in range(spec.num_layers) for e in self.attention_plan(spec, i) + self.ffn_plan(spec, i)]
        return pre + layers + post

    # ------------------------------------------------------------------ config and loading
    @abstractmethod
    def config_dict(self, spec: ExportSpec, scales: dict[int, float]) -> dict[str, Any]:
        """The ``config.json`` content; ``scales`` are the per-layer output scales (ignored when folded)."""

    def load(self, directory: Path, dtype: torch.dtype = torch.float32):
        """Open the written directory the way a user of this format would (in ``dtype``, eval mode)."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, local_files_only=True).eval()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


#: The LLaMA-family config fields every export (and the Mixtral importer) carries over as they are.
LLAMA_FIELDS: tuple[str, ...] = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_dropout",
)


def llama_fields(config: MoeforgeConfig) -> dict[str, Any]:
    """The LLaMA-family fields every export config repeats."""
    keys = LLAMA_FIELDS
    return {k: getattr(config, k) for k in keys if getattr(config, k, None) is not None}


def config_to_dict(config_obj, dtype: torch.dtype, architecture: str) -> dict[str, Any]:
    """A transformers config object as the dict ``save_pretrained`` would write."""
    out = config_obj.to_dict()
    out["architectures"] = [architecture]
    out["dtype"] = dtype_name(dtype)
    return out


def moeforge_aux_loss_coef(hf_coef: float | None, moe_layers: int) -> float:
    """The per-layer ``aux_loss_coef`` that gives a transformers checkpoint's ``router_aux_loss_coef``
    its strength in moeforge, which sums the balance loss over MoE layers (transformers computes one
    loss over all layers' tokens, about the mean of the per-layer losses)."""
    return (1e-3 if hf_coef is None else float(hf_coef)) / max(1, moe_layers)


def parse_hf_config(config_class, cfg: dict[str, Any], family: str):
    """``config_class(**cfg)`` (transformers' defaults and legacy-field handling), with any refusal
    turned into one :class:`MoeforgeError` that names the family and the problem."""
    from ..errors import MoeforgeError, first_line

    try:
        return config_class(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "transformers_version")})
    except Exception as err:  # noqa: BLE001 - transformers raises KeyError, ValueError and its strict-validation errors
        first = first_line(err)
        raise MoeforgeError(f"the {family} config.json is not valid ({type(err).__name__}: {first}); fix the file.") from None


def checked_moeforge_config(fields: dict[str, Any], family: str):
    """``MoeforgeConfig(**fields)`` built from an imported checkpoint, refusals as one :class:`MoeforgeError`."""
    from ..errors import MoeforgeError, first_line
    from ..models.configuration_moeforge import MoeforgeConfig

    try:
        return MoeforgeConfig(**fields)
    except MoeforgeError:
        raise
    except Exception as err:  # noqa: BLE001
        first = first_line(err)
        raise MoeforgeError(f"the {family} checkpoint's config cannot be represented ({type(err).__name__}: {first}).") from None
