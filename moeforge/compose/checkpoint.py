"""Save and load the composition weights alone, tied to the two models they were trained with.

A composition directory holds:

=========================  ==========================================================
file                       content
=========================  ==========================================================
composition.safetensors    the trainable composition weights only, keys below
composition.json           format tag, CALMConfig, layer pairs, and for each model its
                           source, shape summary and weight fingerprint
=========================  ==========================================================

Keys, for connection k (0-based), D_A / D_B the augmenting / anchor widths, I = heads x head_dim:

====================================================  ===========
key                                                   shape
====================================================  ===========
connections.{k}.proj.weight                           (D_B, D_A)
connections.{k}.augmenting_norm.weight (norm=True)    (D_A,)
connections.{k}.anchor_norm.weight (norm=True)        (D_B,)
connections.{k}.attn.{q,k,v}_proj.weight              (I, D_B)
connections.{k}.attn.o_proj.weight                    (D_B, I)
====================================================  ===========

The fingerprint hashes names, shapes and 64 evenly spaced values (rounded to bfloat16) of every
weight, so loading refuses composition weights saved for other models — also models with the
same architecture but different weights — while a float32 and a bfloat16 copy of one model match.
A second fingerprint (``fingerprint_fp16``, values rounded to float16 first) lets a float16 copy
match too: the two roundings disagree on ~6% of values, so the first alone never matches one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import MoeforgeError
from ..utils.fingerprint import fingerprints, fingerprints_match, sampled_digest
from ..utils.io import atomic_write_json, check_safetensors, save_safetensors

FORMAT = "moeforge-calm"
FORMAT_VERSION = 1
WEIGHTS_FILE = "composition.safetensors"
META_FILE = "composition.json"
SAMPLES_PER_TENSOR = 64


def model_fingerprint(model: torch.nn.Module, *, via: torch.dtype | None = None) -> str:
    """A short hash identifying a model's weights (robust to float32 <-> bfloat16 casts; with
    ``via=torch.float16``, to float32 <-> float16 casts)."""
    return sampled_digest(sorted(model.state_dict().items()), SAMPLES_PER_TENSOR, via=via)


def describe_model(model: torch.nn.Module, source: str | None) -> dict:
    """What composition.json records about one model."""
    from .model import decoder_layers  # late import: model imports this module

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return {
        "source": source,
        "model_type": getattr(cfg, "model_type", None),
        "hidden_size": int(cfg.hidden_size),
        "num_layers": len(decoder_layers(model)),
        "vocab_size": int(model.get_input_embeddings().num_embeddings),
        **fingerprints(lambda via: model_fingerprint(model, via=via)),
    }


def read_meta(directory: str | Path) -> dict:
    """composition.json of a composition directory; a clear error when it is not one."""
    directory = Path(directory).expanduser()
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        what = "does not exist" if not directory.exists() else f"holds no {META_FILE}"
        raise MoeforgeError(
            f"{directory} {what}: it is not a CALM composition saved by moeforge "
            "(expected composition.json and composition.safetensors from save_trained)."
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise MoeforgeError(f"{meta_path} is not valid JSON ({err}); re-save the composition.") from None
    if meta.get("format") != FORMAT:
        raise MoeforgeError(f"{meta_path} is not a moeforge CALM composition (format {meta.get('format')!r}).")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise MoeforgeError(
            f"{meta_path} was written by a newer moeforge (format version {meta['format_version']}); upgrade moeforge."
        )
    return meta


def save_composition(directory: str | Path, state: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write weights, then metadata (the completeness marker), into ``directory`` (created if needed), atomically per file."""
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / META_FILE).unlink(missing_ok=True)  # a half-replaced composition never looks complete
    tmp = directory / f".{WEIGHTS_FILE}.tmp"
    save_safetensors({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp, metadata={"format": FORMAT})
    tmp.replace(directory / WEIGHTS_FILE)
    atomic_write_json(directory / META_FILE, {"format": FORMAT, "format_version": FORMAT_VERSION, **meta})
    return directory


def check_models_match(meta: dict, current: dict[str, dict], directory: Path, *, allow_other_models: bool) -> None:
    """Refuse composition weights saved for other models.

    ``current`` maps "anchor"/"augmenting" to :func:`describe_model` of the models at hand.
    Shape differences are always refused; a weight-fingerprint difference unless ``allow_other_models``.
    """
    for role in ("anchor", "augmenting"):
        saved, now = meta[role], current[role]
        for key, label in (("hidden_size", "hidden size"), ("num_layers", "layers"), ("vocab_size", "vocabulary")):
            if saved.get(key) != now.get(key):
                raise MoeforgeError(
                    f"the composition in {directory} was saved for the {role} model {saved.get('source')!r} "
                    f"({label} {saved.get(key)}), but the {role} model given ({now.get('source')!r}) has {label} "
                    f"{now.get(key)}; load it with the models it was trained for."
                )
        same = fingerprints_match(saved, lambda via, now=now: now["fingerprint_fp16" if via else "fingerprint"])
        if not same and not allow_other_models:
            raise MoeforgeError(
                f"the composition in {directory} was trained with the {role} model {saved.get('source')!r} "
                f"(weights {saved.get('fingerprint')}), but the {role} model given ({now.get('source')!r}) has "
                f"different weights ({now.get('fingerprint')}); load it with the models it was trained for, or "
                "pass allow_other_models=True if the change is intended (e.g. a re-quantized copy)."
            )


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise MoeforgeError(f"{directory} has {META_FILE} but no {WEIGHTS_FILE}; the composition is incomplete, re-save it.")
    check_safetensors([path])
    return load_file(str(path))


__all__ = [
    "FORMAT", "META_FILE", "WEIGHTS_FILE", "check_models_match", "describe_model", "load_weights",
    "model_fingerprint", "read_meta", "save_composition",
]
