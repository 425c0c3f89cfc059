"""The dense model being converted: where its tensors come from, which family it is, its key table.

Supported families (``model_type``) and how each maps onto :class:`~moeforge.models.MoeforgeConfig`:

=========  ==========================================================================
llama      as is (SmolLM/SmolLM2 are LLaMA); ``attention_bias`` kept (q, k, v, o biases)
mistral    LLaMA attention plus ``sliding_window``
qwen2      ``attention_bias=True``: q, k, v biases from the checkpoint, a zero ``o_proj`` bias
=========  ==========================================================================

Dense tensor keys (layer i), identical in all three families::

    model.embed_tokens.weight, model.norm.weight, lm_head.weight (absent when tied)
    model.layers.{i}.input_layernorm.weight, model.layers.{i}.post_attention_layernorm.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight (+ .bias for q, k, v when biased)
    model.layers.{i}.mlp.{gate,up,down}_proj.weight     gate/up (I, H), down (H, I)

A source is a checkpoint directory (read tensor by tensor, never memory-mapped), a GGUF file or
alias (dequantized once into moeforge's safetensors cache, then read the same way), or a model
object already in memory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import MoeforgeError
from ..formats.export import LLAMA_FIELDS
from .streaming import SafetensorsReader

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")
MOE_TYPES = ("mixtral", "qwen2_moe", "moeforge", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe")

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
ATTN = "model.layers.{i}.self_attn.{p}_proj.{w}"
IN_NORM = "model.layers.{i}.input_layernorm.weight"
POST_NORM = "model.layers.{i}.post_attention_layernorm.weight"
MLP = "model.layers.{i}.mlp.{p}_proj.weight"

#: config fields copied from the dense model into MoeforgeConfig: the LLaMA-family fields every
#: export carries, plus the dense FFN width (``use_cache`` is left at the config's default)
BASE_FIELDS = ("intermediate_size", *(f for f in LLAMA_FIELDS if f != "use_cache"))


@dataclass
class DenseSource:
    """A dense decoder's config and tensors.

    Attributes:
        family: llama, mistral or qwen2.
        config: the transformers config object of the dense model.
        base: MoeforgeConfig keyword arguments describing the dense architecture.
        name: what the user passed (for messages and the report).
        directory: the checkpoint directory (None for an in-memory model).
        dtype: the dtype of the FFN weights (the default output dtype).
    """

    family: str
    config: Any
    base: dict[str, Any]
    name: str
    directory: Path | None
    dtype: torch.dtype
    _reader: SafetensorsReader | None = None
    _state: dict[str, torch.Tensor] | None = None
    _model: Any = None
    extra_keys: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ tensors
    def keys(self) -> set[str]:
        return self._reader.keys() if self._reader is not None else set(self._state)

    def get(self, key: str) -> torch.Tensor:
        """One tensor as stored (a fresh copy for checkpoints; the live tensor for in-memory models)."""
        if self._reader is not None:
            return self._reader.get(key)
        return self._state[key].detach()

    def shape(self, key: str) -> tuple[int, ...]:
        if self._reader is not None:
            return self._reader.info(key).shape
        return tuple(self._state[key].shape)

    def tensor_dtype(self, key: str) -> torch.dtype:
        if self._reader is not None:
            return self._reader.info(key).dtype
        return self._state[key].dtype

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()

    # ------------------------------------------------------------------ structure
    @property
    def num_layers(self) -> int:
        return self.base["num_hidden_layers"]

    @property
    def hidden_size(self) -> int:
        return self.base["hidden_size"]

    @property
    def intermediate_size(self) -> int:
        return self.base["intermediate_size"]

    @property
    def tied(self) -> bool:
        return bool(self.base.get("tie_word_embeddings"))

    @property
    def qkv_bias(self) -> bool:
        return self.family == "qwen2" or bool(self.base.get("attention_bias"))

    @property
    def o_bias(self) -> bool:
        """Whether the source has an o_proj bias (LLaMA with attention_bias)."""
        return self.family == "llama" and bool(self.base.get("attention_bias"))

    def attention_keys(self, i: int) -> list[str]:
        """The non-FFN keys of layer ``i`` present in the source, in a fixed order."""
        keys = [IN_NORM.format(i=i)]
        for p in ("q", "k", "v", "o"):
            keys.append(ATTN.format(i=i, p=p, w="weight"))
            biased = self.qkv_bias if p != "o" else self.o_bias
            if biased:
                keys.append(ATTN.format(i=i, p=p, w="bias"))
        keys.append(POST_NORM.format(i=i))
        return keys

    def mlp_keys(self, i: int) -> list[str]:
        return [MLP.format(i=i, p=p) for p in ("gate", "up", "down")]

    def global_keys(self) -> list[str]:
        keys = [EMBED, FINAL_NORM]
        if not self.tied:
            keys.append(LM_HEAD)
        return keys

    def read_ffn(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate (I, H), up (I, H), down (H, I)) of layer ``i``."""
        return tuple(self.get(k) for k in self.mlp_keys(i))  # type: ignore[return-value]

    def check_tensors(self) -> None:
        """Every expected tensor is present with the right shape; unknown tensors are refused."""
        h, inter = self.hidden_size, self.intermediate_size
        heads, kv = self.base["num_attention_heads"], self.base["num_key_value_heads"]
        hd = self.base.get("head_dim") or h // heads
        have = self.keys()
        expected: dict[str, tuple[int, ...]] = {EMBED: (self.base["vocab_size"], h), FINAL_NORM: (h,)}
        if not self.tied:
            expected[LM_HEAD] = (self.base["vocab_size"], h)
        out_dims = {"q": heads * hd, "k": kv * hd, "v": kv * hd}
        for i in range(self.num_layers):
            expected[IN_NORM.format(i=i)] = (h,)
            expected[POST_NORM.format(i=i)] = (h,)
            for p, d in out_dims.items():
                expected[ATTN.format(i=i, p=p, w="weight")] = (d, h)
                if self.qkv_bias:
                    expected[ATTN.format(i=i, p=p, w="bias")] = (d,)
            expected[ATTN.format(i=i, p="o", w="weight")] = (h, heads * hd)
            if self.o_bias:
                expected[ATTN.format(i=i, p="o", w="bias")] = (h,)
            expected[MLP.format(i=i, p="gate")] = (inter, h)
            expected[MLP.format(i=i, p="up")] = (inter, h)
            expected[MLP.format(i=i, p="down")] = (h, inter)
        if self.tied:
            have = have - {LM_HEAD}
        ignorable = {k for k in have if k.endswith("rotary_emb.inv_freq")}
        missing = sorted(set(expected) - have)
        extra = sorted(have - set(expected) - ignorable)
        if missing:
            raise MoeforgeError(
                f"{self.name}: the checkpoint lacks {len(missing)} tensor(s) a {self.family} model needs "
                f"(first: {', '.join(missing[:3])}); the checkpoint is incomplete or not a plain {self.family} model."
            )
        if extra:
            raise MoeforgeError(
                f"{self.name}: unexpected tensor(s) for a dense {self.family} model ({', '.join(extra[:3])}); "
                "moeforge converts plain LLaMA, Mistral and Qwen2 decoders only."
            )
        for key, shape in expected.items():
            if self.shape(key) != shape:
                raise MoeforgeError(f"{self.name}: tensor {key!r} has shape {self.shape(key)}, expected {shape} from its config.")


# ---------------------------------------------------------------------------------------- opening
def _family_config(cfg: dict[str, Any]):
    from transformers import AutoConfig

    model_type = cfg.get("model_type")
    if model_type in MOE_TYPES:
        raise MoeforgeError(
            f"the model is already a Mixture-of-Experts model (model_type {model_type!r}); convert takes a dense "
            f"model of a supported family: {', '.join(SUPPORTED_FAMILIES)}."
        )
    if model_type not in SUPPORTED_FAMILIES:
        raise MoeforgeError(
            f"unsupported architecture {model_type!r}: moeforge converts dense models of the families "
            f"{', '.join(SUPPORTED_FAMILIES)} (SmolLM/SmolLM2 are llama)."
        )
    fields = {k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version", "architectures")}
    return AutoConfig.for_model(model_type, **fields)


def base_fields(family: str, config) -> dict[str, Any]:
    """MoeforgeConfig keyword arguments that reproduce a dense ``config`` of ``family``."""
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise MoeforgeError(f"the model uses hidden_act={act!r}; moeforge converts SwiGLU (silu) feed-forward blocks only.")
    if getattr(config, "mlp_bias", False):
        raise MoeforgeError("the model has biases in its feed-forward block (mlp_bias=true); moeforge's experts have no biases.")
    base = {k: getattr(config, k) for k in BASE_FIELDS if getattr(config, k, None) is not None}
    if "head_dim" not in base:
        base["head_dim"] = config.hidden_size // config.num_attention_heads
    if family == "llama":
        base["attention_bias"] = bool(getattr(config, "attention_bias", False))
    elif family == "qwen2":
        if getattr(config, "use_sliding_window", False):
            raise MoeforgeError(
                "the Qwen2 model uses sliding-window attention in some layers (use_sliding_window=true), which "
                "moeforge's model class does not represent; convert a model with full attention."
            )
        base["attention_bias"] = True
    elif family == "mistral":
        base["attention_bias"] = False
        if getattr(config, "sliding_window", None):
            base["sliding_window"] = int(config.sliding_window)
    return base


def _checkpoint_dtype(reader: SafetensorsReader, key: str) -> torch.dtype:
    return reader.info(key).dtype


def open_source(model_or_path, *, allow_pickle: bool = False) -> DenseSource:
    """Open a dense model for conversion: a path, a GGUF file, an alias, or a model object.

    Raises :class:`MoeforgeError` for unsupported architectures, pickle-only checkpoints (unless
    ``allow_pickle``), truncated or corrupted safetensors and unsupported GGUF files.
    """
    if not isinstance(model_or_path, (str, os.PathLike)):
        return _from_model(model_or_path)
    from ..loading import _check_weights, check_gguf_architecture, gguf_checkpoint, read_config, resolve
    from ..utils.io import safetensors_files

    source = resolve(model_or_path)
    name = str(model_or_path)
    if source.kind == "gguf":
        check_gguf_architecture(source.path)
        cached = gguf_checkpoint(source.path)
        if cached is None:  # cache disabled: dequantize in memory
            from ..loading import load

            return _from_model(load(model_or_path), name=name)
        directory = cached
    else:
        directory = source.path
    cfg = read_config(directory)
    _family_config(cfg)  # architecture check before touching weights
    st = safetensors_files(directory)
    if not st:
        _check_weights(directory, allow_pickle)  # raises for pickle-only without opt-in, or no weights
        from ..loading import load

        # pickle opted in: load through transformers (the weights fit in memory by assumption)
        return _from_model(load(directory, allow_pickle=True), name=name)
    reader = SafetensorsReader(st)
    config = _family_config(cfg)
    family = cfg["model_type"]
    base = base_fields(family, config)
    src = DenseSource(
        family=family,
        config=config,
        base=base,
        name=name,
        directory=directory,
        dtype=_checkpoint_dtype(reader, MLP.format(i=0, p="up")) if MLP.format(i=0, p="up") in reader else torch.float32,
        _reader=reader,
    )
    try:
        src.check_tensors()
    except BaseException:
        reader.close()
        raise
    return src


def _from_model(model, name: str | None = None) -> DenseSource:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "state_dict"):
        raise MoeforgeError(
            f"cannot convert an object of type {type(model).__name__}; pass a path, an alias or a transformers causal LM."
        )
    family = getattr(cfg, "model_type", None)
    _family_config({"model_type": family})
    base = base_fields(family, cfg)
    state = {k: v for k, v in model.state_dict().items()}
    if base.get("tie_word_embeddings"):
        state.pop(LM_HEAD, None)
    src = DenseSource(
        family=family,
        config=cfg,
        base=base,
        name=name or getattr(cfg, "name_or_path", None) or type(model).__name__,
        directory=None,
        dtype=state[MLP.format(i=0, p="up")].dtype,
        _state=state,
        _model=model,
    )
    src.check_tensors()
    return src


# ---------------------------------------------------------------------------------------- merging
#: architecture fields every model of a merge must share with the input model
_MERGE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "attention_bias")


#: fields that do not change shapes but change what the attention computes
_MERGE_SOFT_FIELDS = ("rope_parameters", "rms_norm_eps", "sliding_window")


def check_mergeable(base: DenseSource, other: DenseSource, *, average: bool = False) -> list[str]:
    """Raise :class:`MoeforgeError` unless ``other`` has ``base``'s family and shapes (method merge).

    Returns the position and normalisation settings (RoPE, RMSNorm epsilon, sliding window) in
    which ``other`` differs from ``base``: its FFNs then run on the base model's attention, which
    is the user's call for ``--merge-shared base`` (the caller says so) but refused for ``average``,
    whose attention weights were trained under different settings.
    """
    if other.family != base.family:
        raise MoeforgeError(
            f"--expert-model {other.name} is a {other.family} model but the input model {base.name} is {base.family}; "
            "the models of a merge must share one architecture (e.g. fine-tunes of the input model)."
        )
    for name in _MERGE_FIELDS:
        mine, theirs = base.base.get(name), other.base.get(name)
        if mine != theirs:
            raise MoeforgeError(
                f"--expert-model {other.name} has {name} = {theirs}, but the input model {base.name} has {mine}; the "
                "models of a merge must have the same shapes (e.g. fine-tunes of the input model)."
            )
    differ = [f"{name} = {other.base.get(name)} (input model: {base.base.get(name)})" for name in _MERGE_SOFT_FIELDS
              if other.base.get(name) != base.base.get(name)]
    if differ and average:
        raise MoeforgeError(
            f"--expert-model {other.name} has {'; '.join(differ)}; --merge-shared average would average attention "
            "weights trained under different settings. Use --merge-shared base (the input model's attention) or "
            "merge models that share these settings."
        )
    return differ


class _AveragedTensors(Mapping):
    """Read-only key -> tensor view whose values are the element-wise mean over several sources,
    computed and returned in float32 on access (the export's cast to its dtype is the only rounding)."""

    def __init__(self, sources: list[DenseSource]) -> None:
        self.sources = sources

    def __getitem__(self, key: str) -> torch.Tensor:
        total = None
        for src in self.sources:
            t = src.get(key).float()
            total = t if total is None else total.add_(t)
        return total.div_(len(self.sources))

    def __iter__(self):
        return iter(sorted(self.sources[0].keys()))

    def __len__(self) -> int:
        return len(self.sources[0].keys())


def averaged_source(base: DenseSource, sources: list[DenseSource]) -> DenseSource:
    """A dense model whose every tensor is the mean of ``sources``' (Branch-Train-MiX's merge of the
    non-expert weights), with ``base``'s config; tensors are averaged one at a time when read."""
    return DenseSource(family=base.family, config=base.config, base=dict(base.base),
                       name=f"mean of {len(sources)} expert models", directory=None, dtype=base.dtype,
                       _state=_AveragedTensors(sources))  # type: ignore[arg-type]
