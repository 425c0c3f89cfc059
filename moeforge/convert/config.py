"""``ConvertConfig``: every choice of a dense -> MoE conversion, validated at construction.

Field docstrings double as the ``moeforge convert`` help. Checks that need the model (experts
dividing the FFN width, layer indices) run in :meth:`ConvertConfig.check_against`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import MoeforgeError, closest, require
from ..loading import DTYPE_NAMES
from ..utils.validation import check_field_types

#: expert construction methods (see :mod:`moeforge.convert.methods`)
METHOD_NAMES = ("random", "cluster", "coactivation", "importance", "upcycle", "granular-upcycle", "merge")
#: router initialisations (see :mod:`moeforge.convert.gate_init`)
GATE_INIT_NAMES = ("random", "uniform", "centroid", "activation", "domain")
#: where a merged model's attention, norms, embeddings and head come from (method merge)
MERGE_SHARED_NAMES = ("base", "average")
#: layer-wise refinement modes (see :mod:`moeforge.convert.refine`)
REFINE_NAMES = ("none", "router", "down", "router+down", "all")
#: refine modes that take optimiser steps (--refine-steps, --refine-lr); "down" is a closed-form refit
REFINE_BY_STEPS = ("router", "router+down", "all")
#: methods that cluster neurons by balanced k-means (--kmeans-iters)
KMEANS_METHODS = ("cluster", "coactivation")
#: rescale modes besides a number (see :mod:`moeforge.convert.rescale`)
RESCALE_NAMES = ("auto", "none", "layerwise", "fit")
#: export formats (see :mod:`moeforge.formats`)
FORMAT_NAMES = ("auto", "mixtral", "qwen2_moe", "moeforge")
SPLIT_METHODS = ("random", "cluster", "coactivation", "importance")


def _choice(kind: str, value: str, choices: tuple[str, ...], flag: str) -> None:
    if value not in choices:
        raise MoeforgeError(
            f"unknown {kind} {value!r}.{closest(str(value), choices)} Choose {flag} from: {', '.join(choices)}."
        )


#: more layers than any model has: a --layers range beyond it is a typo, not a request
MAX_LAYERS = 100_000


def parse_layers(spec: str | list[int] | tuple[int, ...] | None) -> list[int] | None:
    """'0-3,6,8' or [0, 1] -> sorted unique layer indices; None or 'all' -> None (every layer)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        text = spec.strip()
        if text in ("", "all"):
            return None
        out: set[int] = set()
        for part in text.split(","):
            part = part.strip()
            try:
                lo, hi = (int(v) for v in part.split("-", 1)) if "-" in part else (int(part), int(part))
            except ValueError:
                raise MoeforgeError(f"cannot read --layers {spec!r}; write indices and ranges like '0-3,6'.") from None
            require(lo <= hi, f"--layers range {part!r} is empty; write it low-high, e.g. 0-3.")
            require(hi - lo < MAX_LAYERS, f"--layers range {part!r} spans more than {MAX_LAYERS:,} layers; "
                    "name the model's layers (e.g. 0-29).")
            out.update(range(lo, hi + 1))
        return sorted(out)
    if isinstance(spec, int) and not isinstance(spec, bool):
        return [spec]
    if not isinstance(spec, (list, tuple, set)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in spec):
        raise MoeforgeError(
            f"layers must be a list of layer indices, one index, or a string like '0-3,6'; got {spec!r}."
        )
    return sorted(set(spec))


def _is_model(value) -> bool:
    return hasattr(value, "state_dict") and hasattr(value, "config")


def _name_list(value, name: str, flag: str, *, models: bool = False) -> list | None:
    """None, or a non-empty list of non-empty strings (one string is a list of one); with ``models``,
    in-memory transformers models may stand in for paths."""
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)) or (models and _is_model(value)):
        value = [value]
    ok = isinstance(value, (list, tuple)) and value and all(
        (isinstance(v, (str, os.PathLike)) and str(v).strip()) or (models and _is_model(v)) for v in value)
    if not ok:
        what = "paths, aliases or loaded models" if models else "paths or names"
        raise MoeforgeError(f"{name} ({flag}) must be a non-empty list of {what}, got {value!r}.")
    return [v if models and _is_model(v) else str(v) for v in value]


def _describe_model(value) -> str:
    """A model for the conversion record: its path, or an in-memory model's class and origin."""
    if not _is_model(value):
        return str(value)
    origin = getattr(value.config, "name_or_path", None) or getattr(value.config, "_name_or_path", None)
    return f"<{type(value).__name__}{' from ' + str(origin) if origin else ''}>"


@dataclass
class ConvertConfig:
    """How to turn a dense model's FFN blocks into MoE layers and where to write the result."""

    method: str = "random"
    """Expert construction: random, cluster, coactivation, importance, upcycle, granular-upcycle, or merge (the experts are the FFNs of several dense models, e.g. fine-tunes of the input model: mergekit-moe, Branch-Train-MiX)."""
    experts: int | None = None
    """Routed experts per MoE layer (E); default 8, or one per expert model with method merge."""
    top_k: int = 2
    """Experts each token uses (k); k = E keeps every expert active."""
    shared_experts: int = 0
    """Always-on shared experts (split methods): the FFN is cut into E + S equal parts; the S parts every token uses become shared."""
    router: str = "topk"
    """Router name from moeforge's registry (topk, noisy_topk, switch, expert_choice, sigmoid_bias)."""
    rescale: str | float = "auto"
    """Output scale s of the routed experts (y = s * sum_k w_k E_k(x) + shared): auto (E/k for split methods as LLaMA-MoE, Megatron-LM's factor for upcycling), none (1), layerwise (per layer, output norm matched to the dense FFN on calibration data), fit (per layer, least-squares fit to the dense output) or a number."""
    gate_init: str = "random"
    """Router initialisation: random (small normal), uniform (zeros: equal weights; ties go to the lowest index), centroid (from each expert's neurons), activation (fitted on calibration tokens) or domain (merge: fitted to send each --expert-data text to its expert)."""
    refine: str = "none"
    """Layer-wise local distillation toward the dense FFN after construction: none, router (gradient steps on the router), down (closed-form least-squares refit of the down projections), router+down, or all (router and experts by gradient steps)."""
    refine_steps: int | None = None
    """Optimiser steps per layer for --refine router, router+down or all (default 200)."""
    refine_lr: float | None = None
    """Learning rate for --refine (default 3e-3 for the router alone, 1e-4 when experts train too)."""
    layers: list[int] | None = None
    """Indices of the layers to convert; None converts every layer."""
    format: str = "auto"
    """Export format: auto (the first exact one of mixtral, qwen2_moe, moeforge), mixtral, qwen2_moe or moeforge."""
    seed: int = 0
    """Seed for every random choice (shuffles, k-means init, router init)."""
    calibration: Any = None
    """Text for data-driven steps: a built-in domain name (prose, code, arithmetic, joined with '+'), a .txt/.jsonl path, or a list of strings; default: embedded prose and code."""
    calibration_tokens: int = 8192
    """Calibration tokens used by data-driven steps."""
    calibration_seq_len: int = 256
    """Window length of the calibration sequences."""
    granularity: int | None = None
    """granular-upcycle: G, the number of parts each dense FFN is split into (E must be a multiple; default 2)."""
    upcycle_noise: float = 0.0
    """upcycle: std of Gaussian noise added to each expert copy, relative to each matrix's std."""
    upcycle_reinit: float = 0.0
    """upcycle: fraction of each expert's neurons re-initialised from the dense weights' statistics (Drop-Upcycling)."""
    normalize_weights: bool = True
    """Renormalise the k routing weights to sum to 1 (Mixtral); False keeps the raw softmax mass (Qwen-MoE)."""
    kmeans_iters: int | None = None
    """cluster/coactivation: balanced k-means iterations (default 20)."""
    dtype: str | None = None
    """Output dtype (float32, bfloat16, float16); default: the dense checkpoint's."""
    max_shard_size: str = "2GB"
    """Largest safetensors shard written."""
    router_options: dict[str, Any] = field(default_factory=dict)
    """Extra MoEConfig fields for the router (e.g. aux_loss_coef, capacity_factor)."""
    expert_models: list[Any] | None = None
    """merge: the dense models whose FFNs become the experts, in expert order (paths, GGUF files or aliases, or in Python loaded transformers models; the input model may be one of them). They must share the input model's architecture and shapes, e.g. fine-tunes of it."""
    merge_shared: str = "base"
    """merge: where attention, norms, embeddings and head come from: base (the input model, as mergekit-moe) or average (the mean over the expert models, as Branch-Train-MiX)."""
    expert_data: list[str] | None = None
    """--gate-init domain: one text per expert (a built-in domain or a .txt/.jsonl file), e.g. what each expert model was fine-tuned on; the router is fitted to send each text's tokens to its expert."""

    def __post_init__(self) -> None:
        check_field_types(self, skip=("layers", "rescale", "calibration", "dtype", "refine", "router_options",
                                      "expert_models", "expert_data"))
        _choice("method", self.method, METHOD_NAMES, "--method")
        self.expert_models = _name_list(self.expert_models, "expert_models", "--expert-model", models=True)
        self.expert_data = _name_list(self.expert_data, "expert_data", "--expert-data")
        if self.experts is None:
            self.experts = len(self.expert_models) if self.merges and self.expert_models else 8
        _choice("gate init", self.gate_init, GATE_INIT_NAMES, "--gate-init")
        _choice("refine mode", str(self.refine), REFINE_NAMES, "--refine")
        _choice("format", self.format, FORMAT_NAMES, "--format")
        self._fill_recipe_defaults()
        for name in ("experts", "top_k", "refine_steps", "calibration_tokens", "calibration_seq_len", "granularity", "kmeans_iters"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                    f"{name} must be a positive integer, got {value!r}.")
        require(self.calibration_seq_len >= 2,
                f"calibration_seq_len (--calibration-seq-len) must be at least 2, got {self.calibration_seq_len}: a "
                "window of one token has no next token to predict (the importance method's loss) and no context "
                "for attention.")
        require(
            isinstance(self.shared_experts, int) and self.shared_experts >= 0,
            f"shared_experts must be an integer >= 0, got {self.shared_experts!r}.",
        )
        from ..moe.routers import ROUTERS

        if self.router not in ROUTERS:
            raise MoeforgeError(
                f"unknown router {self.router!r}.{closest(self.router, ROUTERS)} Known routers: {', '.join(sorted(ROUTERS))}."
            )
        require(
            self.top_k <= self.experts,
            f"--top-k {self.top_k} is greater than --experts {self.experts}; choose k <= {self.experts}"
            + (" (expert choice routing does not use k: each expert takes capacity_factor x tokens / E tokens)."
               if self.router == "expert_choice" else "."),
        )
        if self.router == "switch" and self.top_k != 1:
            raise MoeforgeError(f"the switch router routes each token to one expert; use --top-k 1 (got {self.top_k}).")
        self.rescale = self._parse_rescale(self.rescale)
        _choice("merge_shared setting", self.merge_shared, MERGE_SHARED_NAMES, "--merge-shared")
        self._check_merge()
        if self.shared_experts and self.method in ("upcycle", "granular-upcycle"):
            raise MoeforgeError(
                f"--shared-experts needs a method that splits the FFN (random, cluster, coactivation, importance); "
                f"{self.method} copies the whole FFN into every expert."
            )
        if self.method == "granular-upcycle":
            require(
                self.experts % self.granularity == 0,
                f"granular upcycling replicates G = {self.granularity} parts E/G times: --experts {self.experts} must be "
                f"a multiple of --granularity {self.granularity}.",
            )
        if self.router == "expert_choice":
            routed = [flag for flag, on in (("--gate-init activation", self.gate_init == "activation"),
                                            (f"--rescale {self.rescale}", self.rescale in ("layerwise", "fit")),
                                            (f"--refine {self.refine}", self.refine != "none")) if on]
            if routed:
                raise MoeforgeError(
                    f"{', '.join(routed)} fit(s) the routing on calibration tokens one sequence at a time, but expert "
                    "choice routes across a batch (at batch size 1 every expert takes every token), so the fit would "
                    "describe a dense layer. Use --gate-init random/uniform/centroid, --rescale auto or a number, "
                    "and --refine none with --router expert_choice."
                )
        if self.gate_init in ("centroid", "activation") and not self.is_split:  # (merge: refused in _check_merge)
            raise MoeforgeError(
                f"--gate-init {self.gate_init} derives router rows from each expert's own neurons, but {self.method} "
                "makes experts that are copies of each other; use --gate-init random (or uniform) with upcycling."
            )
        require(0.0 <= self.upcycle_reinit <= 1.0, f"upcycle_reinit must be in [0, 1], got {self.upcycle_reinit}.")
        require(math.isfinite(self.upcycle_noise) and self.upcycle_noise >= 0.0,
                f"upcycle_noise must be a finite number >= 0, got {self.upcycle_noise}.")
        require(isinstance(self.seed, int) and 0 <= self.seed < 2**63, f"seed must be an integer in [0, 2^63), got {self.seed}.")
        if self.refine_lr is not None:
            require(math.isfinite(self.refine_lr) and self.refine_lr > 0, f"refine_lr must be a positive number, got {self.refine_lr}.")
        self._refuse_unread()
        from .streaming import parse_size

        try:
            parse_size(self.max_shard_size)  # now, not when the first shard opens (after calibration)
        except MoeforgeError as err:
            raise MoeforgeError(f"max_shard_size (--max-shard-size): {err}") from None
        self.layers = parse_layers(self.layers)
        if self.layers is not None:
            require(len(self.layers) > 0, "--layers selects no layer; name at least one or omit it to convert all.")
            require(min(self.layers) >= 0, f"--layers has a negative index ({min(self.layers)}).")
        if self.dtype is not None:
            if isinstance(self.dtype, str) and self.dtype in DTYPE_NAMES:
                self.dtype = DTYPE_NAMES[self.dtype]
            if isinstance(self.dtype, torch.dtype):  # canonical name: "float32", "bfloat16", ...
                self.dtype = str(self.dtype).removeprefix("torch.")
            _choice("dtype", self.dtype, ("float32", "bfloat16", "float16"), "--dtype")
        require(isinstance(self.router_options, dict),
                f"router_options must be a mapping of MoEConfig fields (e.g. {{'aux_loss_coef': 0.01}}), got {self.router_options!r}.")

    def _check_merge(self) -> None:
        """method merge and --gate-init domain: what they need and what they cannot combine with."""
        if not self.merges:
            require(self.expert_models is None,
                    f"--expert-model names the models whose FFNs become the experts of --method merge; --method "
                    f"{self.method} builds its experts from the input model alone. Use --method merge, or drop --expert-model.")
            require(self.merge_shared == "base", "--merge-shared applies to --method merge only.")
            require(self.gate_init != "domain",
                    f"--gate-init domain sends each --expert-data text to its own expert, which only means something "
                    f"when each expert is a model of that domain (--method merge); --method {self.method} makes "
                    "experts from one model. Use --gate-init activation or centroid for split methods.")
        else:
            require(self.expert_models is not None,
                    "--method merge needs the models whose FFNs become the experts: repeat --expert-model PATH (in "
                    "Python: expert_models=[...]), one per expert.")
            require(len(self.expert_models) == self.experts,
                    f"--method merge makes one expert per --expert-model: {len(self.expert_models)} model(s) for "
                    f"--experts {self.experts}; give {self.experts} models or leave --experts out.")
            refused = [flag for flag, on in (
                (f"--shared-experts {self.shared_experts}", self.shared_experts > 0),
                (f"--gate-init {self.gate_init}", self.gate_init in ("centroid", "activation")),
                (f"--rescale {self.rescale}", self.rescale in ("layerwise", "fit")),
                (f"--refine {self.refine}", self.refine != "none"),
                ("--upcycle-noise / --upcycle-reinit", self.upcycle_noise > 0 or self.upcycle_reinit > 0)) if on]
            if refused:
                raise MoeforgeError(
                    f"{', '.join(refused)} cannot be used with --method merge: those steps split one FFN or fit the "
                    "experts to reproduce the input model's FFN, which would undo what each expert model learned. "
                    "Merge with --gate-init random, uniform or domain and --rescale auto, none or a number.")
        if self.gate_init == "domain":
            require(self.calibration is None,
                    "--calibration is not read with --gate-init domain: each expert's --expert-data text is its "
                    "calibration text. Drop --calibration.")
            require(self.expert_data is not None and len(self.expert_data) == self.experts,
                    f"--gate-init domain needs one --expert-data text per expert ({self.experts}), got "
                    f"{0 if self.expert_data is None else len(self.expert_data)}: repeat --expert-data (a built-in "
                    "domain such as prose, code, arithmetic, or a .txt/.jsonl file) in expert order.")
        else:
            require(self.expert_data is None,
                    f"--expert-data is the text each expert's router row is fitted on (--gate-init domain); with "
                    f"--gate-init {self.gate_init} it would be ignored. Add --gate-init domain or drop --expert-data.")

    def _fill_recipe_defaults(self) -> None:
        """Refuse a recipe-specific count given to a recipe that does not read it (the conversion
        would otherwise succeed as if it had never been given), then fill in the defaults."""
        readers = (
            ("refine_steps", "--refine-steps", 200, self.refine in REFINE_BY_STEPS,
             f"the optimiser steps of --refine {', '.join(REFINE_BY_STEPS)}; with --refine {self.refine} none run"),
            ("granularity", "--granularity", 2, self.method == "granular-upcycle",
             f"the parts per FFN of --method granular-upcycle; --method {self.method} does not read it"),
            ("kmeans_iters", "--kmeans-iters", 20, self.method in KMEANS_METHODS,
             f"the k-means iterations of --method {' and '.join(KMEANS_METHODS)}; --method {self.method} runs no "
             "k-means"),
        )
        for name, flag, default, read, what in readers:
            if getattr(self, name) is None:
                setattr(self, name, default)
            elif not read:
                raise MoeforgeError(f"{flag} ({name}) sets {what}, so it would be ignored; drop it or change the "
                                    "recipe.")

    def _refuse_unread(self) -> None:
        """Options that only some recipes read, refused where nothing would read them (the
        conversion would otherwise succeed as if they had never been given)."""
        if (self.upcycle_noise > 0 or self.upcycle_reinit > 0) and self.is_split:  # (merge: refused in _check_merge)
            raise MoeforgeError(
                f"--upcycle-noise / --upcycle-reinit perturb the expert copies of --method upcycle and granular-upcycle; "
                f"--method {self.method} splits the FFN into different experts and would ignore them. Drop them, or "
                "use --method upcycle or granular-upcycle.")
        if self.refine_lr is not None and self.refine not in REFINE_BY_STEPS:
            raise MoeforgeError(
                f"--refine-lr is the learning rate of --refine router, router+down or all; with --refine {self.refine} "
                "no optimiser runs (down is a closed-form refit) and it would be ignored. Drop --refine-lr or choose "
                "one of those modes.")
        if self.calibration is not None and not self.needs_calibration():
            raise MoeforgeError(
                "--calibration is not read: this recipe uses no calibration data, so it would be ignored. Calibration "
                "text feeds --method coactivation or importance (or cluster with --shared-experts), --gate-init "
                "activation, --rescale layerwise or fit, and --refine; use one of them or drop --calibration.")

    @staticmethod
    def _parse_rescale(value: str | float) -> str | float:
        if isinstance(value, bool):
            raise MoeforgeError(f"rescale must be auto, none, layerwise, fit or a number, got {value!r}.")
        if isinstance(value, (int, float)):
            require(math.isfinite(value) and value > 0, f"--rescale must be a positive number, got {value}.")
            return float(value)
        text = str(value).strip().lower()
        if text in RESCALE_NAMES:
            return text
        try:
            number = float(text)
        except ValueError:
            raise MoeforgeError(
                f"unknown rescale {value!r}.{closest(text, RESCALE_NAMES)} Use auto, none, layerwise, fit or a number (e.g. 4.0)."
            ) from None
        require(math.isfinite(number) and number > 0, f"--rescale must be a positive number, got {value}.")
        return number

    # ------------------------------------------------------------------ derived
    @property
    def is_split(self) -> bool:
        return self.method in SPLIT_METHODS

    @property
    def routed_weight_sum(self) -> float:
        """A token's summed routing weights under a uniform router: 1 for routers that renormalise
        the kept weights (top-k with normalize_weights, noisy top-k, sigmoid_bias with
        normalize_weights); active/E for raw softmax weights (top-k without renormalising, Switch,
        expert choice); active/2 for raw sigmoid scores. Upcycling's output scale divides by it."""
        renormalises = (self.router == "noisy_topk"
                        or (self.router in ("topk", "sigmoid_bias") and self.normalize_weights))
        if renormalises:
            return 1.0
        if self.router == "sigmoid_bias":
            return self.active_experts * 0.5
        return self.active_experts / self.experts

    @property
    def active_experts(self) -> float:
        """Routed experts per token on average: top_k, or expert choice's capacity factor c (each
        expert takes c * tokens / E tokens), which ``--rescale auto`` divides E by."""
        if self.router == "expert_choice":
            c = self.router_options.get("capacity_factor")
            return min(float(self.experts), 2.0 if c is None else float(c))
        return float(self.top_k)

    @property
    def parts(self) -> int:
        """How many equal parts the FFN is cut into: E + S (split), G (granular), 1 (upcycle)."""
        if self.is_split:
            return self.experts + self.shared_experts
        if self.method == "granular-upcycle":
            return self.granularity
        return 1

    def expert_size(self, intermediate_size: int) -> int:
        return intermediate_size // self.parts

    def needs_calibration(self) -> bool:
        return (
            self.method in ("coactivation", "importance")
            or self.gate_init == "domain"
            or self.gate_init == "activation"
            or self.rescale in ("layerwise", "fit")
            or self.refine != "none"
            or (self.method == "cluster" and self.shared_experts > 0)
        )

    def check_against(self, num_layers: int, intermediate_size: int) -> None:
        """Checks that need the dense model: experts dividing the FFN width, layer indices."""
        parts = self.parts
        if intermediate_size % parts:
            what = (
                f"--experts {self.experts} + --shared-experts {self.shared_experts} = {parts}"
                if self.is_split
                else f"--granularity {parts}"
            )
            divisors = [d for d in range(2, min(intermediate_size, 129)) if intermediate_size % d == 0]
            raise MoeforgeError(
                f"{what} does not divide the FFN width {intermediate_size}; every expert must get the same number of "
                f"neurons. Divisors of {intermediate_size} up to 128: {', '.join(map(str, divisors))}."
            )
        if self.layers is not None and max(self.layers) >= num_layers:
            raise MoeforgeError(
                f"--layers names layer {max(self.layers)}, but the model has {num_layers} layers (0-{num_layers - 1})."
            )

    @property
    def merges(self) -> bool:
        return self.method == "merge"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "expert_models" and value is not None:  # never deep-copy an in-memory model
                value = [_describe_model(m) for m in value]
            out[f.name] = copy.deepcopy(value) if isinstance(value, (list, dict)) else value
        if not isinstance(out["calibration"], (str, type(None))):
            out["calibration"] = f"<{type(self.calibration).__name__}>"
        return out

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}
