"""Which modules of a model get adapters: family defaults, name matching, head size.

Defaults follow the papers: (IA)^3/MoV rescale attention keys and values and the FFN
intermediate activation (the input of the FFN's down projection); LoRA/MoLoRA adapt q, k, v, o
and every FFN matrix (Zadouri et al. 2023, sec. 3, "all linear layers" of attention and FFN).
"""

from __future__ import annotations

import re

from torch import nn

from ..errors import MoeforgeError

#: model_type values treated as LLaMA-family decoders (q/k/v/o_proj, gate/up/down_proj).
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "granite")
#: model_type values treated as T5 encoder-decoders (q/k/v/o, wi or wi_0/wi_1, wo).
T5_FAMILY = ("t5", "mt5", "umt5")

#: family -> (vector targets, of which feed-forward (input-rescaled) targets, LoRA targets)
DEFAULT_TARGETS: dict[str, tuple[list[str], list[str], list[str]]] = {
    "llama": (
        ["k_proj", "v_proj", "down_proj"],
        ["down_proj"],
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "t5": (
        ["k", "v", "wo"],
        ["wo"],
        ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"],
    ),
}


def model_family(model: nn.Module) -> str | None:
    """"llama", "t5", or None when moeforge has no defaults for the model's type."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in LLAMA_FAMILY:
        return "llama"
    if model_type in T5_FAMILY:
        return "t5"
    return None


def linear_names(model: nn.Module) -> list[str]:
    """Full names of the model's ``nn.Linear`` modules, in module order."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def describe_linears(model: nn.Module) -> str:
    """A short list of the Linear module names that exist (unique last components, with one example each)."""
    seen: dict[str, str] = {}
    for name in linear_names(model):
        seen.setdefault(name.rsplit(".", 1)[-1], name)
    if not seen:
        return "this model has no nn.Linear modules"
    return ", ".join(f"{short} (e.g. {full})" if short != full else short for short, full in seen.items())


def default_targets(model: nn.Module, method: str) -> tuple[list[str], list[str]]:
    """(targets, feed-forward targets) for ``method`` on ``model``'s family; names absent from the
    model are dropped (T5 v1.0 has ``wi``, v1.1 ``wi_0``/``wi_1``)."""
    family = model_family(model)
    if family is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise MoeforgeError(
            f"moeforge has no default target_modules for model_type {model_type!r} (it knows the LLaMA family: "
            f"{', '.join(LLAMA_FAMILY)}; and T5: {', '.join(T5_FAMILY)}). Pass target_modules=[...] (and "
            f"feedforward_modules for MoV/(IA)^3); this model's Linear modules: {describe_linears(model)}."
        )
    vec, ff, lora = DEFAULT_TARGETS[family]
    targets = vec if method in ("mov", "ia3") else lora
    present = {name.rsplit(".", 1)[-1] for name in linear_names(model)}
    return [t for t in targets if t in present], [t for t in ff if t in present]


def name_matches(name: str, target: str) -> bool:
    """PEFT's rule for one list entry: the full name equals ``target`` or ends with ``"." + target``."""
    return name == target or name.endswith("." + target)


def match_targets(model: nn.Module, targets: list[str] | str, *, strict: bool = True) -> list[str]:
    """Full names of the Linear modules ``targets`` selects, in module order.

    ``targets`` is a list of names/suffixes or one full-match regex; a string without regex
    characters (``"q_proj"``) is one name/suffix, as in a list. With ``strict``, every list
    entry must match at least one module; a target that matches nothing, or matches a module that
    is not an ``nn.Linear``, raises :class:`MoeforgeError` listing the Linear modules that exist.
    """
    from .base import AdapterLayer

    modules = dict(model.named_modules())
    if isinstance(targets, str) and re.fullmatch(r"[\w.]+", targets):
        targets = [targets]  # a plain name: a suffix match, not a full-name regex
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise MoeforgeError(f"target_modules regex {targets!r} is invalid ({err}).") from None
        selected = [n for n in modules if n and pattern.fullmatch(n)]
        entries = {targets: selected}
    else:
        entries = {t: [n for n in modules if n and name_matches(n, t)] for t in targets}
        selected = [n for n in modules if any(n in v for v in entries.values())]
    for target, names in entries.items():
        if not names and strict:
            raise MoeforgeError(
                f"target module {target!r} matches no module of this {type(model).__name__}; "
                f"Linear modules that exist: {describe_linears(model)}."
            )
        for name in names:
            module = modules[name]
            if isinstance(module, AdapterLayer) or any(isinstance(m, AdapterLayer) for m in module.modules()):
                raise MoeforgeError(
                    f"{name} already carries an adapter; call .remove() on the adapted model first, "
                    "or load the adapter onto a fresh base model."
                )
            if not isinstance(module, nn.Linear):
                raise MoeforgeError(
                    f"target module {target!r} matches {name}, a {type(module).__name__}, but adapters wrap "
                    f"nn.Linear modules only; Linear modules that exist: {describe_linears(model)}."
                )
    return [n for n in dict.fromkeys(selected)]


def head_dim_of(model: nn.Module) -> int | None:
    """The attention head size from the model config (``head_dim``, T5's ``d_kv``, or hidden/heads)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    for attr in ("head_dim", "d_kv"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    hidden, heads = getattr(cfg, "hidden_size", None), getattr(cfg, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        return hidden // heads
    return None
