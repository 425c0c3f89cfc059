"""Adapter files: ``adapter_model.safetensors`` plus ``adapter_config.json``.

The safetensors file holds only adapter and router tensors, keyed by their name in the base
model (``model.layers.{i}.self_attn.k_proj.vectors``, ``...k_proj.router.weight``,
``...q_proj.lora_A``, ``...q_proj.lora_B``). The JSON file holds the adapter config, the base
model's identity, and each adapted Linear's shape, so :func:`load_adapter` can refuse a
different base model by naming the shapes that disagree before touching it.

================================================  =====================  ==================
key                                               shape                  method
================================================  =====================  ==================
{module}.vectors                                  (E, d)                 mov, ia3 (E = 1)
{module}.router.weight                            (E, d_router)          mov, molora
{module}.lora_A                                   (E, in, r)             molora, lora (E = 1)
{module}.lora_B                                   (E, r, out)            molora, lora (E = 1)
================================================  =====================  ==================
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import MoeforgeError
from ..utils.fingerprint import fingerprints, fingerprints_match, sampled_digest
from ..utils.io import atomic_write_json, check_safetensors, save_safetensors, temp_file
from .config import MoVConfig, config_from_dict

if TYPE_CHECKING:
    from .model import AdaptedModel

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "moeforge-peft-adapter"
FORMAT_VERSION = 1


def _module_record(layer) -> dict:
    from .mov import MoVLayer

    record = {"in_features": layer.in_features, "out_features": layer.out_features}
    if isinstance(layer, MoVLayer):
        record.update(position=layer.position, heads=layer.heads)
    return record


def save_adapter(model: AdaptedModel, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the adapter files into ``directory`` (created if missing); other files there are left alone.

    Each file is written to a temporary name and renamed into place; the JSON config is written
    last, so a directory with ``adapter_config.json`` holds a complete adapter. An existing adapter
    is refused unless ``overwrite``.
    """

    from .. import __version__

    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise MoeforgeError(f"{directory} exists and is not a directory; choose another adapter path.")
    if (directory / ADAPTER_CONFIG).exists() and not overwrite:
        raise MoeforgeError(f"{directory} already holds an adapter; choose another directory or pass overwrite=True.")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.adapter_state_dict().items()}
    base = model.base_model
    base_cfg = getattr(base, "config", None)
    adapter_ids = {id(t) for t in model.adapter_state_dict().values()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "moeforge_version": __version__,
        "config": model.peft_config.to_dict(),
        "base_model": {
            "class": type(base).__name__,
            "model_type": getattr(base_cfg, "model_type", None),
            "name_or_path": getattr(base_cfg, "name_or_path", None) or getattr(base_cfg, "_name_or_path", None),
            "num_parameters": sum(p.numel() for p in base.parameters() if id(p) not in adapter_ids),
            **fingerprints(lambda via: base_fingerprint(base, adapter_ids, via=via)),
        },
        # a list, so the model's module order survives the JSON writer's key sorting
        "modules": [{"name": name, **_module_record(layer)} for name, layer in model.adapter_layers().items()],
    }
    tmp = temp_file(directory, prefix=f".{ADAPTER_WEIGHTS}.")
    try:
        save_safetensors(tensors, tmp, metadata={"format": "pt", "moeforge": FORMAT})
        os.replace(tmp, directory / ADAPTER_WEIGHTS)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    atomic_write_json(directory / ADAPTER_CONFIG, meta)
    return directory


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """The parsed ``adapter_config.json`` of an adapter directory, checked for format."""
    directory = Path(directory).expanduser()
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        hint = ""
        if (directory / "config.json").is_file():
            hint = " It holds config.json: that is a full model checkpoint, open it with moeforge.load()."
        elif not directory.exists():
            hint = " The directory does not exist."
        raise MoeforgeError(f"{directory} is not an adapter directory: {ADAPTER_CONFIG} is missing.{hint}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MoeforgeError(f"{path} is not valid JSON ({err}); re-save the adapter.") from None
    if not isinstance(meta, dict):
        raise MoeforgeError(f"{path} is not an adapter config (a JSON object was expected); re-save the adapter.")
    if meta.get("format") != FORMAT:
        raise MoeforgeError(
            f"{path} was not written by moeforge.peft (format {meta.get('format')!r}); "
            "adapters from other libraries are not read here."
        )
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise MoeforgeError(f"{path} is damaged: format_version is {version!r}, not an integer; re-save the adapter.")
    if version > FORMAT_VERSION:
        raise MoeforgeError(f"{path} uses adapter format version {meta['format_version']}; upgrade moeforge to read it.")
    _check_structure(path, meta)
    return meta


def _check_structure(path: Path, meta: dict) -> None:
    """Refuse a damaged config (hand-edited, truncated by another tool) with one message, not a KeyError."""
    def damaged(what: str) -> MoeforgeError:
        return MoeforgeError(f"{path} is damaged: {what}; re-save the adapter.")

    if not isinstance(meta.get("config"), dict):
        raise damaged("'config' (the adapter settings) is missing or not an object")
    if "base_model" in meta and not isinstance(meta["base_model"], dict):
        raise damaged("'base_model' is not an object")
    modules = meta.get("modules")
    if not isinstance(modules, list) or not modules:
        raise damaged("'modules' (the adapted modules) is missing or not a non-empty list")
    for i, rec in enumerate(modules):
        ok = isinstance(rec, dict) and isinstance(rec.get("name"), str) and rec["name"] and all(
            isinstance(rec.get(k), int) and not isinstance(rec.get(k), bool) and rec[k] > 0
            for k in ("in_features", "out_features"))
        if not ok:
            raise damaged(f"modules[{i}] needs a name and positive integer in_features and out_features, got {rec!r}")


def _shape_disagreements(base_model: nn.Module, modules: dict[str, dict]) -> list[str]:
    present = dict(base_model.named_modules())
    problems = []
    for name, rec in modules.items():
        module = present.get(name)
        saved = f"Linear({rec['in_features']} -> {rec['out_features']})"
        if module is None:
            problems.append(f"{name}: adapter made for {saved}, this model has no such module")
        elif not isinstance(module, nn.Linear):
            problems.append(f"{name}: adapter made for {saved}, this model has a {type(module).__name__}")
        elif (module.in_features, module.out_features) != (rec["in_features"], rec["out_features"]):
            problems.append(f"{name}: adapter made for {saved}, this model has Linear({module.in_features} -> {module.out_features})")
    return problems


def _refuse(directory: Path, meta: dict, problems: list[str], what: str) -> MoeforgeError:
    base = meta.get("base_model", {})
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    return MoeforgeError(
        f"the adapter in {directory} was saved for another base model ({base.get('model_type')!r}, "
        f"{base.get('name_or_path')!r}, {base.get('num_parameters')} parameters): {what} disagree: {shown}."
    )


def base_fingerprint(model: nn.Module, skip_ids: set[int] = frozenset(), *, via: torch.dtype | None = None) -> str:
    """A short hash of a base model's weights: shapes and 64 evenly spaced values (rounded to
    bfloat16) of every parameter in module order, adapter parameters (``skip_ids``) left out, so
    the wrapped and the unwrapped model agree and a float32 / bfloat16 copy of one model match
    (``via=torch.float16``: the digest a float16 copy matches, see :func:`sampled_digest`)."""
    return sampled_digest(((None, p) for p in model.parameters() if id(p) not in skip_ids), via=via)


def load_adapter(base_model: nn.Module, directory: str | os.PathLike, *, allow_other_base: bool = False) -> AdaptedModel:
    """Put an adapter saved by :meth:`AdaptedModel.save_adapter` back on ``base_model``.

    The base model must have the same adapted modules with the same shapes as the one the adapter
    was saved from; otherwise :class:`MoeforgeError` names the shapes that disagree and nothing is
    changed. Only ``adapter_model.safetensors`` is read (never pickle). Returns the adapted model
    (base frozen, adapters trainable, as after :func:`~moeforge.peft.wrap`). A base whose modules
    fit but whose weights differ from the one the adapter was trained on (a fingerprint recorded
    at saving) is refused unless ``allow_other_base``.
    """
    from safetensors import safe_open

    from .model import AdaptedModel, wrap

    if isinstance(base_model, (str, os.PathLike)) and isinstance(directory, nn.Module):
        raise MoeforgeError("load_adapter takes (base_model, adapter_directory); the arguments are swapped.")
    if isinstance(base_model, (str, os.PathLike)):
        from ..loading import load

        base_model = load(base_model)
    if not isinstance(directory, (str, os.PathLike)):
        raise MoeforgeError(f"load_adapter's second argument is the adapter directory, got a {type(directory).__name__}.")
    directory = Path(directory).expanduser()
    meta = read_adapter_config(directory)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise MoeforgeError(f"{directory} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}; the adapter is incomplete.")
    check_safetensors([weights])
    if isinstance(base_model, AdaptedModel):
        raise MoeforgeError("load_adapter needs a base model without adapters; call .remove() first or load a fresh one.")
    config = config_from_dict(meta["config"], where=str(directory / ADAPTER_CONFIG))
    modules: dict[str, dict] = {m["name"]: m for m in meta["modules"]}
    problems = _shape_disagreements(base_model, modules)
    if problems:
        raise _refuse(directory, meta, problems, "module shapes")
    saved = meta.get("base_model", {})
    same = saved.get("fingerprint") is None or fingerprints_match(saved, lambda via: base_fingerprint(base_model, via=via))
    if not same and not allow_other_base:
        raise MoeforgeError(
            f"the adapter in {directory} was trained on another base model ({saved.get('name_or_path')!r}, "
            f"{saved.get('num_parameters')} parameters; this one has {sum(p.numel() for p in base_model.parameters())}): "
            "its adapted modules fit, but the weights differ, so the adapter would not do what it was trained "
            "to. Load the base it was trained on, or pass allow_other_base=True to apply it anyway."
        )
    changes: dict = {"target_modules": "|".join(re.escape(n) for n in modules)}
    if isinstance(config, MoVConfig):
        ff = [n for n, rec in modules.items() if rec.get("position") == "input"]
        changes["feedforward_modules"] = "|".join(re.escape(n) for n in ff) if ff else []
    # refuse before modifying the base model: build on the config, then compare tensor shapes
    with safe_open(str(weights), framework="pt") as f:
        saved_keys = set(f.keys())
        saved_shapes = {k: tuple(f.get_slice(k).get_shape()) for k in saved_keys}
    adapted = wrap(base_model, config.replace(**changes))
    expected = {k: tuple(v.shape) for k, v in adapted.adapter_state_dict().items()}
    problems = [f"{k}: saved {saved_shapes[k]}, this model needs {expected[k]}"
                for k in sorted(expected) if k in saved_shapes and saved_shapes[k] != expected[k]]
    missing = sorted(set(expected) - saved_keys)
    unexpected = sorted(saved_keys - set(expected))
    problems += [f"{k}: missing from the adapter file" for k in missing[:3]]
    problems += [f"{k}: in the adapter file but not in this model's adapters" for k in unexpected[:3]]
    if problems:
        adapted.remove()
        raise _refuse(directory, meta, problems, "tensor shapes")
    state = adapted.adapter_state_dict()
    with safe_open(str(weights), framework="pt") as f, torch.no_grad():
        for key, param in state.items():
            param.copy_(f.get_tensor(key).to(param.device, param.dtype))
    return adapted
