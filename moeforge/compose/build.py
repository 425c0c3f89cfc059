"""Entry points: ``compose`` two models, ``compose_from_config`` for the trainer, ``load_composition``.

Models are given as transformers causal LMs or as anything :func:`moeforge.load` opens (paths,
GGUF files, the ``smollm2`` alias); the tokenizers are compared before anything is built.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import MoeforgeError
from . import checkpoint as ckpt
from .config import CALMConfig
from .model import ComposedForCausalLM, decoder_layers
from .vocab import check_shared_vocabulary, find_tokenizer

ModelLike = nn.Module | str | os.PathLike

#: keys of the trainer's ``compose:`` section handled here rather than by :class:`CALMConfig`.
SECTION_KEYS = ("augmenting", "init_from", "allow_other_models")


def _open(role: str, model: ModelLike, tokenizer, dtype) -> tuple[nn.Module, Any, str | None]:
    """(model, tokenizer or None, source name) for a model object or a path/alias."""
    from ..loading import load, load_tokenizer

    if isinstance(model, nn.Module):
        _check_causal_lm(role, model)
        if tokenizer is None:
            tokenizer = find_tokenizer(model)
        source = getattr(model.config, "_name_or_path", None) or None
        from ..loading import ALIASES

        if source is not None and source not in ALIASES and Path(source).expanduser().exists():
            source = str(Path(source).expanduser().resolve())  # recorded for load_composition: not cwd-relative
        return model, tokenizer, source
    if not isinstance(model, (str, os.PathLike)):
        raise MoeforgeError(f"the {role} model must be a causal LM or a path/alias, got {type(model).__name__}.")
    try:
        opened = load(model, dtype=dtype)
    except MoeforgeError as err:
        raise MoeforgeError(f"{role} model: {err}") from None
    if tokenizer is None:
        try:
            tokenizer = load_tokenizer(model)
        except MoeforgeError:  # no tokenizer files beside it: the vocabulary sizes are compared instead
            tokenizer = None
    _check_causal_lm(role, opened)
    from ..loading import ALIASES

    name = str(model)
    return opened, tokenizer, name if name in ALIASES else str(Path(name).expanduser().resolve())


def _check_causal_lm(role: str, model: nn.Module) -> None:
    if not (hasattr(model, "config") and hasattr(model, "get_input_embeddings")):
        raise MoeforgeError(
            f"the {role} model ({type(model).__name__}) is not a transformers causal LM; CALM composes two causal LMs."
        )
    decoder_layers(model)


def compose(
    anchor: ModelLike,
    augmenting: ModelLike,
    num_connections: int | None = None,
    *,
    config: CALMConfig | None = None,
    anchor_tokenizer=None,
    augmenting_tokenizer=None,
    dtype: str | torch.dtype | None = None,
    **settings: Any,
) -> ComposedForCausalLM:
    """Compose ``anchor`` (m_B, produces the output) with ``augmenting`` (m_A, lends its states).

    Args:
        anchor, augmenting: transformers causal LMs, or paths/aliases for :func:`moeforge.load`.
        num_connections: n; connects every (N_A/n)-th layer of m_A to every (N_B/n)-th of m_B.
        config: a full :class:`CALMConfig` (``num_connections`` and ``settings`` override its fields).
        anchor_tokenizer, augmenting_tokenizer: for the vocabulary check; found beside the
            checkpoints when omitted. Without both, only the vocabulary sizes are compared.
        dtype: dtype for models opened from paths.
        settings: other :class:`CALMConfig` fields (``norm``, ``num_heads``, ``anchor_layers``...).

    Both models are frozen (``requires_grad=False``, eval mode); the composed model starts equal
    to the anchor because each connection's output projection is zero.
    """
    changes = dict(settings)
    if num_connections is not None:
        changes["num_connections"] = num_connections
    if config is None:
        config = CALMConfig.from_dict(changes)
    elif changes:
        CALMConfig.check_keys(changes)
        config = dataclasses.replace(config, **changes)
    anchor_model, anchor_tok, anchor_src = _open("anchor", anchor, anchor_tokenizer, dtype)
    aug_dtype = dtype if dtype is not None else next(anchor_model.parameters()).dtype
    aug_model, aug_tok, aug_src = _open("augmenting", augmenting, augmenting_tokenizer, aug_dtype)
    check_shared_vocabulary(
        anchor_model, aug_model, anchor_tok, aug_tok,
        anchor_name=anchor_src or type(anchor_model).__name__,
        augmenting_name=aug_src or type(aug_model).__name__,
    )
    return ComposedForCausalLM(anchor_model, aug_model, config, sources={"anchor": anchor_src, "augmenting": aug_src})


def compose_from_config(anchor_model: nn.Module, section: dict[str, Any], *, anchor_tokenizer=None) -> ComposedForCausalLM:
    """Build the composition described by a trainer config's ``compose:`` section around ``anchor_model``.

    Section keys: ``augmenting`` (required: path or alias of m_A, opened with :func:`moeforge.load`),
    ``init_from`` (optional: a composition directory to start from), ``allow_other_models``
    (with ``init_from``), and any :class:`CALMConfig` field, e.g.::

        compose:
          augmenting: runs/kv_memory_model
          num_connections: 2
    """
    config = check_section(section)
    composed = compose(anchor_model, section["augmenting"], config=config, anchor_tokenizer=anchor_tokenizer)
    if section.get("init_from"):
        composed.load_trained(section["init_from"], allow_other_models=section.get("allow_other_models", False))
    return composed


def check_section(section: dict[str, Any]) -> CALMConfig:
    """The :class:`CALMConfig` of a ``compose:`` section, after every check that needs no model
    (the trainer runs them when it reads the config, before any model loads)."""
    if not isinstance(section, dict):
        raise MoeforgeError(f"the compose section must be a mapping of settings, got {type(section).__name__}.")
    config = CALMConfig.from_dict(section, extra_keys=SECTION_KEYS)
    if not section.get("augmenting"):
        raise MoeforgeError(
            "the compose section needs 'augmenting': the path or alias of the augmenting model m_A "
            "(e.g. `augmenting: smollm2`)."
        )
    _check_section_values(section)
    return config


def _check_section_values(section: dict[str, Any]) -> None:
    """Refuse wrongly typed section keys that :class:`CALMConfig` does not check (a quoted
    ``allow_other_models: "false"`` would otherwise count as true)."""
    for key in ("augmenting", "init_from"):
        value = section.get(key)
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise MoeforgeError(
                f"compose.{key} must be a path or alias (a string), got {value!r} ({type(value).__name__})."
            )
    allow = section.get("allow_other_models", False)
    if not isinstance(allow, bool):
        raise MoeforgeError(
            f"compose.allow_other_models must be true or false, got {allow!r} ({type(allow).__name__}); "
            "write it unquoted."
        )


def load_composition(
    directory: str | os.PathLike,
    anchor: ModelLike | None = None,
    augmenting: ModelLike | None = None,
    *,
    allow_other_models: bool = False,
    dtype: str | torch.dtype | None = None,
) -> ComposedForCausalLM:
    """Rebuild a composed model from :meth:`~ComposedForCausalLM.save_trained` output.

    The models default to the sources recorded in composition.json; pass them to override (their
    weights must match the recorded fingerprints unless ``allow_other_models``).
    """
    directory = Path(directory).expanduser()
    meta = ckpt.read_meta(directory)
    models = {}
    for role, given in (("anchor", anchor), ("augmenting", augmenting)):
        if given is None:
            given = meta[role].get("source")
            if not given:
                raise MoeforgeError(
                    f"{directory / ckpt.META_FILE} records no source for the {role} model (it was composed from an "
                    f"in-memory model); pass {role}=MODEL to load_composition."
                )
        models[role] = given
    config = CALMConfig.from_dict(meta["calm"])
    composed = compose(models["anchor"], models["augmenting"], config=config, dtype=dtype)
    return composed.load_trained(directory, allow_other_models=allow_other_models)


__all__ = ["SECTION_KEYS", "compose", "compose_from_config", "load_composition"]
