"""``moeforge.convert``: dense checkpoint in, MoE checkpoint (or in-memory model) out.

The conversion streams: tensors are read one at a time from the dense checkpoint, each layer's
FFN is converted and written before the next is read, and the output shards are laid out in
advance (:mod:`moeforge.convert.streaming`). Data-driven steps add the dense model's
layer-by-layer activations on the calibration tokens (:mod:`moeforge.convert.calibration`).

Before success is reported, the export is re-read byte for byte against digests taken while
writing, reopened the way its users open it (plain ``transformers`` for ``mixtral`` and
``qwen2_moe``) and its logits compared with moeforge's model of the same weights; any failure
raises :class:`~moeforge.errors.MoeforgeError` and leaves no output directory behind.

Example::

    import moeforge
    report = moeforge.convert("smollm2", out="smollm2-moe", experts=8, top_k=2,
                              method="coactivation", gate_init="activation", rescale="layerwise")
    print(report.summary())
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import MoeforgeError
from ..formats import EXPORT_ORDER, EXPORTERS
from ..formats.export import DenseLayerWeights, Exporter, ExportSpec, MoELayerWeights
from ..formats.moeforge_format import final_moeforge_config
from ..models.configuration_moeforge import MoeforgeConfig
from ..moe.config import MoEConfig
from .calibration import DenseRunner, calibration_windows, domain_windows, importance_pass
from .config import ConvertConfig
from .layer import LayerConverter, LayerReport, layer_generator
from .reference import ReferenceStore
from .methods.base import DenseFFN
from .source import (ATTN, EMBED, FINAL_NORM, IN_NORM, LM_HEAD, POST_NORM, DenseSource, averaged_source,
                     check_mergeable, open_source)
from ..utils.memory import trim_heap
from .streaming import ShardedWriter, parse_size
from . import verify as _verify

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ConvertReport:
    """Outcome of a conversion.

    out: the written directory (None for an in-memory conversion); format: the format written.
    parameters: {"dense": {"total", "active"}, "moe": {...}}; flops_per_token: {"dense", "moe"}.
    perplexity: {"dense", "moe", "tokens", "text"} on held-out embedded prose, when evaluated.
    verification: what was checked (tensors, max_abs_diff, tokens, layers).
    layers: one :class:`LayerReport` per converted layer; seconds: wall time per stage.
    model: the converted :class:`~moeforge.models.MoeforgeForCausalLM` when kept in memory.
    """

    out: Path | None
    format: str
    config: ConvertConfig
    source: str
    parameters: dict[str, dict[str, int]]
    flops_per_token: dict[str, int]
    layers: list[LayerReport] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    perplexity: dict[str, Any] | None = None
    format_notes: dict[str, str] = field(default_factory=dict)
    evaluation_note: str | None = None
    model: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out) if self.out else None,
            "format": self.format,
            "source": self.source,
            "config": self.config.to_dict(),
            "parameters": self.parameters,
            "flops_per_token": self.flops_per_token,
            "perplexity": self.perplexity,
            "verification": self.verification,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "format_notes": self.format_notes,
            "layers": [asdict(r) for r in self.layers],
        }

    @property
    def mean_layer_error(self) -> float | None:
        errors = [r.error for r in self.layers if r.error is not None]
        return sum(errors) / len(errors) if errors else None

    def summary(self) -> str:
        """A small plain-text table: parameters, active parameters, FLOPs/token, perplexity."""
        d, m = self.parameters["dense"], self.parameters["moe"]
        rows = [
            ("", "dense", "MoE"),
            ("parameters", f"{d['total']:,}", f"{m['total']:,}"),
            ("active parameters / token", f"{d['active']:,}", f"{m['active']:,}"),
            ("FLOPs / token (512 ctx)", f"{self.flops_per_token['dense']:,}", f"{self.flops_per_token['moe']:,}"),
        ]
        if self.perplexity:
            p = self.perplexity
            rows.append((f"perplexity ({p['tokens']} held-out tokens)", f"{p['dense']:.2f}", f"{p['moe']:.2f}"))
            rows.append(("tokens / s (forward)", f"{p['dense_tokens_per_second']:.0f}", f"{p['moe_tokens_per_second']:.0f}"))
        width = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(c.ljust(width[i]) if i == 0 else c.rjust(width[i]) for i, c in enumerate(r)) for r in rows]
        ratio = self.flops_per_token["moe"] / self.flops_per_token["dense"]
        lines.append(f"MoE FLOPs per token = {ratio:.2f} x dense")
        if self.mean_layer_error is not None:
            lines.append(f"mean layer output error on calibration tokens: {self.mean_layer_error:.3f}")
        if self.perplexity is None and self.evaluation_note:
            lines.append(self.evaluation_note)
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------- helpers
def _moe_config(cfg: ConvertConfig, source: DenseSource) -> MoEConfig:
    m = cfg.expert_size(source.intermediate_size)
    fields: dict[str, Any] = {
        "hidden_size": source.hidden_size,
        "num_experts": cfg.experts,
        "top_k": cfg.top_k,
        "expert_size": m,
        "router": cfg.router,
        "normalize_weights": cfg.normalize_weights,
        "num_shared_experts": cfg.shared_experts,
        "shared_expert_size": m if cfg.shared_experts else None,
    }
    for key, value in cfg.router_options.items():
        if key in fields or key in ("output_scale", "extra", "glu", "activation", "shared_expert_gate"):
            raise MoeforgeError(f"router option {key!r} is set by the conversion itself; remove it from router_options.")
        fields[key] = value
    if cfg.router == "expert_choice" and "expert_choice_causal" not in fields and "allow_future_tokens" not in fields:
        fields["expert_choice_causal"] = True
    return MoEConfig.from_dict(fields)


def _converted_config(source: DenseSource, moe: MoEConfig, cfg: ConvertConfig) -> MoeforgeConfig:
    moe_dict = moe.to_dict()
    moe_dict.pop("hidden_size")
    moe_dict["extra"] = {"conversion": {"method": cfg.method, "gate_init": cfg.gate_init, "rescale": cfg.rescale,
                                        "refine": cfg.refine, "seed": cfg.seed, "source": source.name}}
    return MoeforgeConfig(**source.base, moe=moe_dict, moe_layers=cfg.layers)


def _router_state_shapes(moe: MoEConfig) -> dict[str, tuple[int, ...]]:
    from ..moe.routers import build_router

    with torch.device("meta"):
        router = build_router(moe)
    shapes = {k: tuple(v.shape) for k, v in router.state_dict().items()}
    return {"weight": shapes.pop("weight"), **shapes}


def choose_exporter(name: str, spec: ExportSpec) -> tuple[Exporter, dict[str, str]]:
    """The exporter for ``--format name`` (auto: the first exact one), and why others were skipped."""
    notes: dict[str, str] = {}
    for fmt in EXPORT_ORDER:
        reason = EXPORTERS[fmt].unsupported(spec)
        if reason:
            notes[fmt] = reason
    if name == "auto":
        for fmt in EXPORT_ORDER:
            if fmt not in notes:
                return EXPORTERS[fmt], notes
    exporter = EXPORTERS[name]
    if name in notes:
        exact = [f for f in EXPORT_ORDER if f not in notes]
        raise MoeforgeError(
            f"--format {name} cannot hold this model exactly: {notes[name]}. Formats that can: {', '.join(exact)} "
            "(or --format auto)."
        )
    return exporter, notes


def _count_parameters(config: MoeforgeConfig) -> tuple[dict[str, int], int]:
    from ..eval.cost import flops_per_token, parameter_counts
    from ..models.modeling_moeforge import MoeforgeForCausalLM

    with torch.device("meta"):
        model = MoeforgeForCausalLM(config)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return parameter_counts(model), flops_per_token(model)


def _tokenizer_for(source: DenseSource, tokenizer):
    if tokenizer is not None:
        return tokenizer
    if source.directory is None:
        return None
    from ..loading import load_tokenizer

    try:
        return load_tokenizer(source.directory)
    except MoeforgeError:
        return None


def _estimate_bytes(spec: ExportSpec, exporter: Exporter) -> int:
    return sum(e.nbytes for e in exporter.plan(spec))


#: models up to this many float32 bytes are verified whole and evaluated (if memory allows)
WHOLE_MODEL_LIMIT = 4 << 30


def _keep_whole_reference(total_bytes_f32: int) -> bool:
    """Whether to keep the whole converted model in memory for verification and evaluation.

    Small models (up to 4 GiB in float32, about 1B parameters) are, when four copies fit in the
    available memory; larger ones stream and are verified on their first layers.
    """
    try:
        import psutil

        available = psutil.virtual_memory().available
    except Exception:  # pragma: no cover - psutil is a dependency of the environment
        available = 8 << 30
    return total_bytes_f32 <= WHOLE_MODEL_LIMIT and 4 * total_bytes_f32 < available


# ---------------------------------------------------------------------------------------- convert
def convert(
    model_or_path,
    out: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    tokenizer=None,
    verify: bool | str = True,
    eval_tokens: int = 4096,
    progress: Callable[[str], None] | None = None,
    **options: Any,
) -> ConvertReport:
    """Convert a dense LLaMA/Mistral/Qwen2 model into an MoE model.

    Args:
        model_or_path: a checkpoint directory, a GGUF file, the alias ``smollm2``, or a
            transformers model object (then pass ``tokenizer`` for data-driven steps).
        out: output directory, written atomically; None converts in memory only and returns the
            model in ``report.model`` (nothing is written, no export verification). With ``out``
            given, ``report.model`` is None: open the written model with ``moeforge.load(out)``.
        overwrite: replace an existing ``out`` (only after the new one is complete and verified).
        allow_pickle: accept a pickle-only (``.bin``) dense checkpoint.
        tokenizer: tokenizer for calibration/evaluation when ``model_or_path`` is a model object.
        verify: check the written export before reporting success: every tensor re-read against its
            digest, then the export reloaded and its logits compared with moeforge's. True ("auto")
            reloads the whole model when it fits in memory twice, else its first layers; "full"
            or "layers" force one or the other; False skips the checks.
        eval_tokens: held-out embedded prose tokens for the dense-vs-MoE perplexity (0 skips it).
        progress: callable receiving one-line progress messages.
        **options: :class:`ConvertConfig` fields: method, experts, top_k, shared_experts, router,
            rescale, gate_init, refine, refine_steps, layers, format, seed, calibration,
            calibration_tokens, granularity, upcycle_noise, upcycle_reinit, normalize_weights,
            dtype, max_shard_size, router_options, ...
    Returns:
        :class:`ConvertReport`.
    Raises:
        MoeforgeError: bad options, unsupported or broken inputs, an existing ``out`` without
            ``overwrite``, or a failed verification (then nothing is left at ``out``).
    """
    unknown = set(options) - ConvertConfig.field_names()
    if unknown:
        from ..errors import closest

        name = sorted(unknown)[0]
        raise MoeforgeError(f"unknown conversion option {name!r}.{closest(name, ConvertConfig.field_names())}")
    cfg = ConvertConfig(**options)
    if not isinstance(eval_tokens, int) or eval_tokens < 0 or eval_tokens == 1:
        raise MoeforgeError(f"eval_tokens (--eval-tokens) must be 0 (skip the perplexity) or at least 2 (a perplexity "
                            f"needs a token and its successor), got {eval_tokens!r}.")
    say = progress or (lambda _m: None)
    if out is None:
        if cfg.format != "auto" or overwrite:
            given = f"format={cfg.format!r}" if cfg.format != "auto" else "overwrite=True"
            raise MoeforgeError(f"{given} applies to a written export, but out=None converts in memory and writes "
                                "nothing; pass out=DIR to write one, or leave it out.")
        return _convert(model_or_path, None, cfg, allow_pickle, tokenizer, verify, eval_tokens, say)
    from ..utils.io import atomic_output_dir

    _check_replaceable(Path(out).expanduser().resolve(), model_or_path, overwrite, cfg.expert_models or ())
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        report = _convert(model_or_path, tmp, cfg, allow_pickle, tokenizer, verify, eval_tokens, say)
        report.out = Path(out).expanduser().resolve()
        (tmp / "moeforge_conversion.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _check_replaceable(out: Path, model_or_path, overwrite: bool, expert_models=()) -> None:
    """--overwrite replaces earlier conversions only: never the input model or an --expert-model, a
    folder holding one, or a folder of anything else."""
    if not overwrite or not out.exists():
        return
    inputs = [("the input model", model_or_path)] + [("--expert-model", m) for m in expert_models]
    for what, given in inputs:
        if isinstance(given, (str, os.PathLike)) and Path(given).expanduser().exists():
            source = Path(given).expanduser().resolve()
            if source == out or out in source.parents:
                raise MoeforgeError(
                    f"--out {out} holds {what} {source}; replacing --out would delete it. Choose another --out."
                )
    if out.is_dir() and any(out.iterdir()) and not (out / "moeforge_conversion.json").is_file():
        raise MoeforgeError(
            f"--out {out} exists and is not a moeforge conversion (no moeforge_conversion.json); refusing to "
            "delete it with --overwrite. Choose another --out, or remove it yourself."
        )


def _convert(model_or_path, tmp: Path | None, cfg: ConvertConfig, allow_pickle: bool, tokenizer, verify: bool | str,
             eval_tokens: int, say: Callable[[str], None]) -> ConvertReport:
    t_start = time.perf_counter()
    source = open_source(model_or_path, allow_pickle=allow_pickle)
    expert_sources: list[DenseSource] = []
    try:
        for name in cfg.expert_models or ():
            expert_sources.append(open_source(name, allow_pickle=allow_pickle))
            differ = check_mergeable(source, expert_sources[-1], average=cfg.merge_shared == "average")
            if differ:
                say(f"note: --expert-model {expert_sources[-1].name} has {'; '.join(differ)}; its FFNs will run on the input model's "
                    "attention and settings")
        job = _Conversion(source, tmp, cfg, tokenizer, verify, eval_tokens, say, expert_sources)
        try:
            report = job.run()
        finally:
            job.store.close()
        report.seconds["total"] = time.perf_counter() - t_start
        return report
    finally:
        for src in (source, *expert_sources):
            src.close()


class _Conversion:
    """One conversion: plan, calibration, the streaming layer loop, config files, verification, evaluation."""

    def __init__(self, source: DenseSource, tmp: Path | None, cfg: ConvertConfig, tokenizer, verify: bool | str,
                 eval_tokens: int, say: Callable[[str], None], expert_sources: list[DenseSource] | None = None) -> None:
        cfg.check_against(source.num_layers, source.intermediate_size)
        self.source, self.tmp, self.cfg, self.say, self.eval_tokens = source, tmp, cfg, say, eval_tokens
        self.expert_sources = expert_sources or []
        # where every tensor but the converted FFNs comes from: the input model, or for a merge with
        # --merge-shared average the mean of the expert models (the calibration runs on it too)
        self.shared = averaged_source(source, self.expert_sources) if cfg.merge_shared == "average" else source
        self.seconds: dict[str, float] = {}
        self.moe = _moe_config(cfg, source)
        self.config = _converted_config(source, self.moe, cfg)
        dtype = DTYPES[cfg.dtype] if cfg.dtype else source.dtype
        self.dtype = dtype if dtype in DTYPES.values() else torch.float32
        self.spec = ExportSpec(config=self.config, dtype=self.dtype, qkv_bias=source.qkv_bias, o_bias=source.o_bias,
                               router_state=_router_state_shapes(self.moe))
        if tmp is None:
            self.exporter, self.notes, self.fmt = EXPORTERS["moeforge"], {}, "memory"
        else:
            self.exporter, self.notes = choose_exporter(cfg.format, self.spec)
            self.fmt = self.exporter.name
        self.converted = set(range(source.num_layers)) if cfg.layers is None else set(cfg.layers)
        self.tokenizer = _tokenizer_for(source, tokenizer)
        # what the export is verified against: a reference model assembled from the same weights by
        # module attribute (models.build.model_from_parts), never through a format's key table
        self.mode = "auto" if verify is True else (verify or "off")
        if self.mode not in ("auto", "full", "layers", "off"):
            raise MoeforgeError(f"verify must be one of auto (True), full, layers or off (False); got {verify!r}.")
        f32_bytes = sum(e.nbytes for e in EXPORTERS["moeforge"].plan(
            ExportSpec(self.config, torch.float32, self.spec.qkv_bias, self.spec.o_bias, self.spec.router_state)))
        self.keep_all = tmp is None or self.mode == "full" or (self.mode == "auto" and _keep_whole_reference(f32_bytes))
        self.need_reference = tmp is None or self.mode != "off" or bool(eval_tokens and self.keep_all)
        n = source.num_layers if self.keep_all else _layers_to_verify(source.num_layers, self.converted)
        self.keep_layers = set(range(n)) if self.need_reference else set()
        self.store = ReferenceStore(spill_parent=None if self.keep_all else tmp.parent)
        self.writer: ShardedWriter | None = None
        self.labels: torch.Tensor | None = None  # (T,) expert of each calibration token (--gate-init domain)

    # ------------------------------------------------------------------ steps
    def run(self) -> ConvertReport:
        src, cfg = self.source, self.cfg
        self.say(f"converting {src.name} ({src.family}, {src.num_layers} layers, FFN {src.intermediate_size}) into "
                 f"{cfg.experts} experts, top-{cfg.top_k}, method {cfg.method}, format {self.fmt}")
        runner, windows, importance = self.calibrate()
        if self.tmp is not None:
            self.writer = ShardedWriter(self.tmp, self.exporter.plan(self.spec),
                                        max_shard_bytes=parse_size(cfg.max_shard_size),
                                        metadata={"moeforge_conversion": cfg.method})
        t0 = time.perf_counter()
        layer_reports, scales = self.stream(runner, windows, importance)
        self.seconds["layers"] = time.perf_counter() - t0
        report = self.make_report(layer_reports, scales)
        if self.writer is not None:
            t0 = time.perf_counter()
            self.writer.close()
            text = json.dumps(self.exporter.config_dict(self.spec, scales), indent=2, sort_keys=True) + "\n"
            (self.tmp / "config.json").write_text(text)
            _write_generation_config(src, self.tmp, self.config)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(self.tmp))
            else:
                self.say("note: no tokenizer was found beside the input model, so the output has none; copy the "
                         "tokenizer files (tokenizer.json, tokenizer_config.json) into the output directory before "
                         "running `moeforge eval` or generating text with it")
            self.seconds["write"] = time.perf_counter() - t0
        verifying = self.writer is not None and self.mode != "off"
        t0 = time.perf_counter()
        if verifying:
            self.say("verifying the export: re-reading every tensor, reloading and comparing logits")
            checked = self.writer.verify_digests()
        ref_model = self.reference_model(scales) if self.need_reference and self.keep_all else None
        if verifying:
            ids = _verify.verification_ids(self.tokenizer, self.config.vocab_size)
            if ref_model is not None:
                with torch.no_grad():
                    want = ref_model(ids, use_cache=False).logits.float()
                layers = ref_model.config.num_hidden_layers
                got = _verify.export_logits(self.exporter, self.tmp, ids)
            else:
                # large model: first layers only, each side one module in float32 at a time, never together
                trim_heap()  # freed blocks of the streaming and re-reading, before the check allocates its own
                want = self.reference_logits_layers(scales, ids)
                trim_heap()
                layers = len(self.keep_layers)
                got = _verify.export_logits(self.exporter, self.tmp, ids, layers=layers, dtype=self.dtype)
            diff = _verify.check_logits(got, want, self.exporter.name)
            report.verification = {"tensors_checked": checked, "max_abs_logit_diff": diff, "tokens": int(ids.numel()),
                                   "layers_compared": layers, "whole_model": self.keep_all,
                                   "loaded_with": "transformers" if self.exporter.plain_transformers else "moeforge"}
            self.seconds["verify"] = time.perf_counter() - t0
        if self.eval_tokens and self.keep_all and self.tokenizer is not None:
            t0 = time.perf_counter()
            report.perplexity = _evaluate(src, ref_model, self.tokenizer, self.eval_tokens)
            self.seconds["evaluate"] = time.perf_counter() - t0
        elif self.eval_tokens:
            report.evaluation_note = (
                "perplexity skipped: " + (
                    "no tokenizer found for the model" if self.tokenizer is None else
                    "--verify off keeps no dense copy to compare with; run `moeforge eval` on the dense model and "
                    "on the output directory" if self.mode == "off" else
                    "the model is too large to hold dense and MoE copies in memory; run `moeforge eval` on the "
                    "output directory")
            )
        report.model = ref_model if self.tmp is None else None
        return report

    def calibrate(self):
        """(runner, windows, importance) for data-driven steps, or Nones."""
        cfg = self.cfg
        if not cfg.needs_calibration():
            return None, None, None
        if self.tokenizer is None:
            shared = " with --shared-experts" if cfg.method == "cluster" and cfg.shared_experts else ""
            raise MoeforgeError(
                f"--method {cfg.method}{shared} / --gate-init {cfg.gate_init} / --rescale {cfg.rescale} / --refine "
                f"{cfg.refine} need calibration text, but no tokenizer was found for the model; pass tokenizer=... "
                "or use data-free options (method random/upcycle, or cluster without shared experts; gate init "
                "random/uniform/centroid; rescale auto/none/number)."
            )
        seq_len = cfg.calibration_seq_len
        if self.config.sliding_window:
            seq_len = min(seq_len, self.config.sliding_window)
        if cfg.gate_init == "domain":
            windows, self.labels = domain_windows(self.tokenizer, cfg.expert_data, cfg.calibration_tokens, seq_len)
        else:
            windows = calibration_windows(self.tokenizer, cfg.calibration, cfg.calibration_tokens, seq_len)
        runner = DenseRunner(self.shared)
        short = (f" (the calibration text holds no more; --calibration-tokens asked for {cfg.calibration_tokens})"
                 if windows.numel() + windows.shape[1] <= cfg.calibration_tokens else "")
        self.say(f"calibration: {windows.numel()} tokens in {windows.shape[0]} windows of {windows.shape[1]}{short}")
        importance = None
        if cfg.method == "importance":
            t0 = time.perf_counter()
            importance, _ = importance_pass(runner, windows, cfg.experts, generator=layer_generator(cfg.seed, -1),
                                            read_ffn=lambda i: DenseFFN(*self.source.read_ffn(i)), progress=self.say)
            self.seconds["importance"] = time.perf_counter() - t0
        return runner, windows, importance

    def emit(self, pairs: list[tuple[str, torch.Tensor]]) -> None:
        if self.writer is not None:
            for key, tensor in pairs:
                self.writer.write(key, tensor)

    def remember(self, pairs: list[tuple[str, torch.Tensor]], layer: int | None) -> None:
        if not self.need_reference or (layer is not None and layer not in self.keep_layers):
            return
        keys = self.shared.keys()
        for key, tensor in pairs:
            if self.store.spilled and key in keys:  # unchanged dense tensor: re-read from the source at the end
                self.store.add_from_source(key, key, self.dtype, self.shared.get)
            else:
                self.store.add_tensors([(key, tensor)])

    def passthrough(self, key: str) -> torch.Tensor:
        return self.shared.get(key).to(self.dtype)

    def stream(self, runner, windows, importance) -> tuple[list[LayerReport], dict[int, float]]:
        """Read, convert and write every layer in order; return the layer reports and output scales."""
        src, spec, exporter = self.source, self.spec, self.exporter
        converter = LayerConverter(self.cfg, self.moe)
        reports: list[LayerReport] = []
        scales: dict[int, float] = {}
        embed = [(EMBED, self.passthrough(EMBED))]
        self.emit(embed)
        self.remember(embed, None)
        del embed
        h = runner.embed(windows) if runner is not None else None
        ref_biases = (bool(self.config.attention_bias),) * 2
        for i in range(src.num_layers):
            t_layer = time.perf_counter()
            # norms and attention: copied (dtype cast) under LLaMA keys, biases as each format wants them
            layer_src = {k: self.passthrough(k) for k in src.attention_keys(i)}
            self.emit(_attention_pairs(layer_src, i, *exporter.attention_biases(spec), self.dtype))
            self.remember(_attention_pairs(layer_src, i, *ref_biases, self.dtype), i)
            ffn = DenseFFN(*self.shared.read_ffn(i))
            calib = None
            if runner is not None and i <= max(self.converted):  # no calibration needed past the last converted layer
                h, calib = runner.layer(i, h, ffn)
                if importance is not None:
                    calib.importance = importance[i]
                if self.labels is not None:
                    calib.labels = self.labels
            if i in self.converted:
                expert_ffns = [DenseFFN(*s.read_ffn(i)) for s in self.expert_sources] if self.cfg.merges else None
                weights, rep = converter.convert(i, ffn, norm_weight=layer_src[POST_NORM.format(i=i)].float(),
                                                 calib=calib, expert_ffns=expert_ffns)
                del expert_ffns
                # stock formats store the router at the model's precision: use that rounding everywhere
                if exporter.fold_scale or self.dtype != torch.float32:
                    weights.router = weights.router.to(self.dtype).float()
                scales[i] = weights.output_scale
                if exporter.fold_scale:
                    weights = weights.folded()
                reports.append(rep)
                msg = f"layer {i} ({i + 1}/{src.num_layers}): scale {rep.output_scale:.3g}"
                if "domain_accuracy" in rep.info:  # chance is 1/E: near it, the --expert-data texts look alike
                    msg += f", router tells the domains apart on {rep.info['domain_accuracy']:.0%} of tokens"
                if rep.error is not None:
                    msg += f", output error {rep.error:.3f}"
                    if rep.error_before_refine is not None:
                        msg += f" (before refine {rep.error_before_refine:.3f})"
            else:
                weights = DenseLayerWeights(ffn.gate, ffn.up, ffn.down)
                msg = f"layer {i} ({i + 1}/{src.num_layers}): kept dense"
            self.emit(exporter.ffn_tensors(spec, i, weights))
            if i in self.keep_layers:
                self.store.add_ffn(i, _cast(weights, self.dtype))
            del weights, ffn, calib, layer_src
            trim_heap()  # hand this layer's freed blocks back so the resident size tracks one layer
            self.say(msg + f" ({time.perf_counter() - t_layer:.1f}s)")
        tail = [(FINAL_NORM, self.passthrough(FINAL_NORM))]
        if not src.tied:
            tail.append((LM_HEAD, self.passthrough(LM_HEAD)))
        self.emit(tail)
        self.remember(tail, None)
        return reports, scales

    def reference_config(self, scales: dict[int, float]) -> MoeforgeConfig:
        folded = {i: 1.0 for i in scales} if self.exporter.fold_scale else dict(scales)
        return final_moeforge_config(self.spec, folded)

    def make_report(self, layer_reports: list[LayerReport], scales: dict[int, float]) -> ConvertReport:
        params_dense, flops_dense = _count_parameters(MoeforgeConfig(**self.source.base, moe_layers=[]))
        params_moe, flops_moe = _count_parameters(self.reference_config(scales))
        return ConvertReport(
            out=None, format=self.fmt, config=self.cfg, source=self.source.name,
            parameters={"dense": params_dense, "moe": params_moe},
            flops_per_token={"dense": flops_dense, "moe": flops_moe},
            layers=layer_reports, seconds=self.seconds, format_notes=self.notes,
        )

    def reference_model(self, scales: dict[int, float]):
        """The converted model in float32, assembled from the kept tensors (whole models only)."""
        from ..models.build import model_from_parts

        state, ffn = self.store.load()
        model = model_from_parts(self.reference_config(scales), state, ffn, dtype=torch.float32)
        self.store.close()
        return model

    def reference_logits_layers(self, scales: dict[int, float], ids: torch.Tensor) -> torch.Tensor:
        """Float32 logits on ``ids`` of the converted model's first layers, at about one layer of memory.

        The layers are assembled in the export dtype without embedding table or LM head; the
        embedding rows of ``ids`` and the head are read from the source when needed.
        """
        from ..models.build import model_from_parts

        config = _truncated(self.reference_config(scales), len(self.keep_layers))
        state, ffn = self.store.load(exclude=frozenset({EMBED, LM_HEAD}))
        model = model_from_parts(config, state, ffn, dtype=self.dtype, unset=frozenset({EMBED, LM_HEAD}))
        del state, ffn
        self.store.close()
        embeds = self.passthrough(EMBED)[ids]
        head_key = EMBED if self.shared.tied else LM_HEAD
        body = model.model
        del model
        return _verify.layerwise_logits(body, embeds, lambda: self.passthrough(head_key))


def _layers_to_verify(num_layers: int, converted: set[int]) -> int:
    """How many leading layers the first-layers check of a large model runs: :data:`VERIFY_LAYERS`,
    or up to the first converted layer when the ones before it were kept dense (checking only
    those would compare untouched dense layers and never an MoE block)."""
    return min(num_layers, max(_verify.VERIFY_LAYERS, min(converted) + 1))


def _cast(weights, dtype: torch.dtype):
    """The layer's FFN tensors rounded to the export dtype (the router keeps its float32 values)."""
    if isinstance(weights, DenseLayerWeights):
        return DenseLayerWeights(weights.gate.to(dtype), weights.up.to(dtype), weights.down.to(dtype))
    opt = (lambda t: None if t is None else t.to(dtype))
    return MoELayerWeights(weights.router, weights.gate_up.to(dtype), weights.down.to(dtype), opt(weights.shared_gate),
                           opt(weights.shared_up), opt(weights.shared_down), weights.output_scale,
                           dict(weights.router_extra))


def _attention_pairs(layer_src: dict[str, torch.Tensor], i: int, qkv_bias: bool, o_bias: bool,
                     dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """Layer ``i``'s norms and attention tensors in plan order; a bias the source lacks is zero."""
    pairs = [(IN_NORM.format(i=i), layer_src[IN_NORM.format(i=i)])]
    for p in ("q", "k", "v", "o"):
        weight = layer_src[ATTN.format(i=i, p=p, w="weight")]
        pairs.append((ATTN.format(i=i, p=p, w="weight"), weight))
        if (o_bias if p == "o" else qkv_bias):
            bkey = ATTN.format(i=i, p=p, w="bias")
            pairs.append((bkey, layer_src[bkey] if bkey in layer_src else torch.zeros(weight.shape[0], dtype=dtype)))
    pairs.append((POST_NORM.format(i=i), layer_src[POST_NORM.format(i=i)]))
    return pairs


def _truncated(config: MoeforgeConfig, n: int) -> MoeforgeConfig:
    cfg = config.to_dict()
    for k in ("architectures", "transformers_version", "model_type", "dtype", "torch_dtype"):
        cfg.pop(k, None)
    return MoeforgeConfig(**_verify.truncated_config_dict(cfg, n))


def _write_generation_config(source: DenseSource, tmp: Path, config: MoeforgeConfig) -> None:
    if source.directory is not None and (source.directory / "generation_config.json").is_file():
        shutil.copyfile(source.directory / "generation_config.json", tmp / "generation_config.json")
        return
    from transformers import GenerationConfig

    gen = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                           pad_token_id=config.pad_token_id)
    gen.save_pretrained(str(tmp))


def held_out_ids(tokenizer, max_tokens: int) -> torch.Tensor:
    """Token ids of the held-out embedded prose (the valid split of the built-in ``prose`` corpus)."""
    from ..eval.corpora import resolve_corpus, tokenize_corpus

    return tokenize_corpus(tokenizer, resolve_corpus("prose"), max_tokens)


def _evaluate(source: DenseSource, moe_model, tokenizer, max_tokens: int) -> dict[str, Any]:
    from ..eval.perplexity import evaluate_nll

    ids = held_out_ids(tokenizer, max_tokens)
    dense = source._model
    if dense is None:
        from ..loading import load

        dense = load(source.directory)
    seq_len = min(512, ids.numel())
    d = evaluate_nll(dense, ids, seq_len=seq_len)
    m = evaluate_nll(moe_model, ids, seq_len=seq_len)
    return {"dense": d.perplexity, "moe": m.perplexity, "tokens": int(ids.numel()), "text": "held-out embedded prose",
            "dense_tokens_per_second": d.tokens_per_second, "moe_tokens_per_second": m.tokens_per_second}
