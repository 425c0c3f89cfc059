"""Atomic, resumable training checkpoints: ``OUTPUT_DIR/checkpoints/step-NNNNNN/``.

A checkpoint holds what a resumed run needs to continue exactly as the uninterrupted run:

====================  =====================================================================
file                  content
====================  =====================================================================
trainable.safetensors the trainable parameters, the persistent buffers of modules that own
                      them, and every ``sigmoid_bias`` router's ``bias`` buffer (frozen
                      parameters are not stored: PEFT/CALM checkpoints stay small)
optimizer.safetensors AdamW state tensors, keyed ``<parameter name>::<state name>``
optimizer.json        AdamW param groups (hyper-parameters and parameter names)
rng-<rank>.safetensors / rng-<rank>.json   each process's torch / CUDA / Python / NumPy RNG state
state.json            step, tokens seen, data position, mixture weights and reference losses,
                      the open logging window, and the model's fingerprint (written last)
====================  =====================================================================

No pickle anywhere. The directory is written under a temporary name and renamed when
complete, so a crash or a full disk while saving leaves the previous checkpoint intact; the
last ``keep_last`` checkpoints are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import MoeforgeError
from ..utils.io import save_safetensors

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with state.json) as (step, path), oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "state.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


# ------------------------------------------------------------------------------ what is saved
def trainable_names(model: nn.Module) -> list[str]:
    """State-dict keys a checkpoint stores: trainable parameters, persistent buffers of the
    modules owning them, and all ``sigmoid_bias`` router bias buffers."""
    from ..moe.routers import SigmoidBiasRouter

    names: list[str] = []
    seen: set[str] = set()

    def add(name: str) -> None:
        if name not in seen:
            seen.add(name)
            names.append(name)

    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if own:
            for n in own:
                add(prefix + n)
            for n, _ in module.named_buffers(recurse=False):
                if n not in module._non_persistent_buffers_set:
                    add(prefix + n)
        if isinstance(module, SigmoidBiasRouter):
            add(prefix + "bias")
    # drop aliases of tied parameters that named_parameters() deduplicates
    canonical = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return [n for n in names if n in canonical]


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Identify a model: class, every parameter's name/shape/trainability, and a digest of the
    frozen weights' values (frozen weights are not in the checkpoint, so a different base must be caught)."""
    shapes = hashlib.sha256()
    frozen = hashlib.sha256()
    for name, p in model.named_parameters():
        shapes.update(f"{name}:{tuple(p.shape)}:{p.requires_grad};".encode())
        if not p.requires_grad:
            flat = p.detach().reshape(-1)
            stride = max(1, flat.numel() // 64)
            sample = flat[::stride][:64].double().cpu()
            frozen.update(f"{name}:{float(sample.sum()):.9e}:{float(sample.abs().sum()):.9e};".encode())
    return {
        "model_class": type(model).__name__,
        "config": model_config(model),
        "parameters": shapes.hexdigest()[:16],
        "frozen_values": frozen.hexdigest()[:16],
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


#: config keys that say how a model was saved or runs, not what it computes
RUNTIME_CONFIG_KEYS = frozenset({
    "transformers_version", "architectures", "dtype", "torch_dtype", "use_cache", "_name_or_path",
    "_attn_implementation", "attn_implementation", "_commit_hash",
})


def flatten_settings(value: Any, prefix: str = "", out: dict[str, Any] | None = None) -> dict[str, Any]:
    """Nested settings as dotted keys (``moe.top_k``: 2); a list of named mappings (data sources)
    is keyed by name, with the names themselves under ``"PREFIX (sources)"``."""
    out = {} if out is None else out
    if isinstance(value, dict):
        for k, v in value.items():
            flatten_settings(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
        for v in value:
            flatten_settings({k: x for k, x in v.items() if k != "name"}, f"{prefix}.{v['name']}", out)
        out[f"{prefix} (sources)"] = [v["name"] for v in value]
    else:
        out[prefix] = value
    return out


def setting_changes(old: dict[str, Any], new: dict[str, Any], skip=lambda key: False) -> list[str]:
    """``key old -> new`` for each dotted key (of :func:`flatten_settings`) whose value differs,
    ``'unset'`` standing for a missing key; keys for which ``skip(key)`` is true are left out."""
    return [f"{k} {old.get(k, 'unset')!r} -> {new.get(k, 'unset')!r}" for k in sorted(set(old) | set(new))
            if not skip(k) and old.get(k, "unset") != new.get(k, "unset")]


def model_config(model: nn.Module) -> dict[str, Any] | None:
    """The model's architecture settings as dotted keys (``moe.top_k``: 2), None when it has no
    transformers config: two models of the same shapes may still route or compute differently."""
    cfg = getattr(model, "config", None)
    if not hasattr(cfg, "to_diff_dict"):
        return None
    out = flatten_settings({k: v for k, v in cfg.to_diff_dict().items() if k not in RUNTIME_CONFIG_KEYS})
    return json.loads(json.dumps(out, sort_keys=True, default=str))  # as state.json gives it back


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    if "config" not in saved:  # a checkpoint written before the model's config was recorded
        current = {k: v for k, v in current.items() if k != "config"}
    if saved == current:
        return
    what = []
    if saved.get("model_class") != current.get("model_class"):
        what.append(f"class {saved.get('model_class')} vs {current.get('model_class')}")
    changed = setting_changes(saved.get("config") or {}, current.get("config") or {})
    if changed:
        what.append(f"its config differs: {', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''}")
    if saved.get("parameters") != current.get("parameters"):
        what.append(
            f"parameter names/shapes/trainability differ ({saved.get('num_parameters'):,} params, "
            f"{saved.get('num_trainable'):,} trainable vs {current.get('num_parameters'):,}, {current.get('num_trainable'):,})"
        )
    elif saved.get("frozen_values") != current.get("frozen_values"):
        what.append("the frozen weights have different values (a different base model)")
    raise MoeforgeError(
        f"checkpoint {path} was written for a different model ({'; '.join(what) or 'fingerprint differs'}). "
        "Use the model and train_params the run started with, or choose a new output_dir (or --overwrite true)."
    )


# --------------------------------------------------------------------------------- tensor I/O
def _write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file and fsync it (the one place bytes hit the disk; tests make it fail)."""
    save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_json(data: Any, path: Path) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True, default=_json_default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _json_default(obj):
    if isinstance(obj, tuple):
        return list(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:
        raise MoeforgeError(f"{path} is unreadable ({err}); the checkpoint is damaged, delete it to resume from an earlier one.") from None


# ---------------------------------------------------------------------------- optimizer state
def flatten_optimizer(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """FQN-keyed optimizer state dict (torch.distributed.checkpoint form) -> (tensors, json)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for fqn, state in osd.get("state", {}).items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{fqn}::{key}"] = value
            else:
                scalars.setdefault(fqn, {})[key] = value
    return tensors, {"param_groups": osd.get("param_groups", []), "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        fqn, name = key.rsplit("::", 1)
        state.setdefault(fqn, {})[name] = value
    for fqn, values in meta.get("scalars", {}).items():
        state.setdefault(fqn, {}).update(values)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# --------------------------------------------------------------------------------------- RNG
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in tensors]
        if states:
            torch.cuda.set_rng_state_all(states)
    v, internal, gauss = meta["python"]
    random.setstate((v, tuple(internal), gauss))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


# ----------------------------------------------------------------------------------- save/load
def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    ctx,
    model_state: dict[str, torch.Tensor] | None,
    optimizer_state: dict[str, Any] | None,
    trainer_state: dict[str, Any] | None,
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` atomically (collective: every process calls it).

    ``model_state``, ``optimizer_state`` and ``trainer_state`` are needed on the main process
    only; every process writes its own RNG state. On failure (e.g. a full disk) the partial
    directory is removed, earlier checkpoints are untouched, and :class:`MoeforgeError` is raised
    on every process.
    """
    root = Path(output_dir) / CHECKPOINTS
    final = root / step_name(step)
    tmp = root / f".{step_name(step)}.tmp"
    error = ""
    if ctx.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".step-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        except OSError as err:
            error = str(err)
    ok = ctx.all_true(not error)
    if ok:
        try:
            r_tensors, r_meta = rng_state()
            _write_tensors(r_tensors, tmp / f"rng-{ctx.rank}.safetensors")
            _write_json(r_meta, tmp / f"rng-{ctx.rank}.json")
        except OSError as err:
            error = str(err)
        ok = ctx.all_true(not error)
    if ok and ctx.is_main:
        try:
            _write_tensors(model_state, tmp / "trainable.safetensors")
            o_tensors, o_meta = flatten_optimizer(optimizer_state)
            _write_tensors(o_tensors, tmp / "optimizer.safetensors")
            _write_json(o_meta, tmp / "optimizer.json")
            _write_json(trainer_state, tmp / "state.json")
            if final.exists():  # an earlier attempt at this step (e.g. resumed and re-saved)
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as err:
            error = str(err)
    ok = ctx.all_true(not error)
    if not ok:
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = [p for _, p in list_checkpoints(output_dir)]
        keep = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise MoeforgeError(
            f"could not write checkpoint {final}: {error or 'another process failed to write its part'}; {keep}. "
            "Free disk space (or fix the output directory) and rerun the same command to resume."
        )
    if ctx.is_main:
        for _, old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()
    return final


def load_checkpoint(path: Path, rank: int) -> dict[str, Any]:
    """Read a checkpoint directory: {"model", "optimizer", "state", "rng": (tensors, meta) | None}."""
    try:
        state = json.loads((path / "state.json").read_text())
        o_meta = json.loads((path / "optimizer.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MoeforgeError(f"checkpoint {path} is damaged ({err}); delete it to resume from an earlier one.") from None
    needed = ("step", "tokens", "fingerprint", "domains", "sampler", "mixture", "window", "train_loss_since_update")
    missing = [k for k in needed if not isinstance(state, dict) or k not in state]
    if missing or not isinstance(o_meta, dict):
        raise MoeforgeError(
            f"checkpoint {path} is damaged (state.json or optimizer.json lacks {', '.join(missing) or 'its fields'}); "
            "delete it to resume from an earlier one."
        )
    model = _read_tensors(path / "trainable.safetensors")
    optimizer = unflatten_optimizer(_read_tensors(path / "optimizer.safetensors"), o_meta)
    rng = None
    if (path / f"rng-{rank}.safetensors").is_file():
        rng = (_read_tensors(path / f"rng-{rank}.safetensors"), json.loads((path / f"rng-{rank}.json").read_text()))
    return {"model": model, "optimizer": optimizer, "state": state, "rng": rng}
