"""``TrainConfig``: everything one training run needs, loaded from YAML with ``--key value`` overrides.

One config drives every training mode: continual pre-training (CPT) on a domain mixture,
supervised fine-tuning (SFT) on chat data, parameter-efficient MoE (``peft:`` section) and
composition (``compose:`` section). Every section is a dataclass validated at construction;
an unknown key anywhere is refused with the closest valid key::

    model: runs/smollm2-moe-8x2
    output_dir: runs/cpt
    data:
      - {name: prose, builtin: prose, weight: 0.5}
      - {name: code, builtin: code, weight: 0.3}
      - {name: arithmetic, builtin: arithmetic, weight: 0.2}
    mixture: {type: dynamic, update_every: 50, reference_model: smollm2}
    steps: 200
    batch_size: 8
    seq_len: 256
    lr: 2.0e-4

Overrides use dotted keys; a list of data sources is addressed by index or by name:
``--lr 1e-4 --mixture.eta 0.5 --data.code.weight 0.4``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MoeforgeError, closest, require

#: the names routers give their aux losses (``Routing.aux_losses``), the keys of ``aux_loss_scales``
AUX_LOSS_NAMES = ("balance_loss", "z_loss")

FORMATS = ("auto", "text", "jsonl", "datasets")
KINDS = ("auto", "text", "chat")
MIXTURES = ("static", "dynamic")
SIGNALS = ("valid", "train")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
TRAIN_PARAMS = ("auto", "all", "moe", "router")
PARALLEL = ("ddp", "fsdp")
ATTENTION = ("auto", "blocked", "model")


@dataclass
class DataSource:
    """One named domain of training data: a file/directory/glob or a built-in domain."""

    name: str
    """Domain name (used in metrics, plots, mixture weights and ``--data.NAME.key`` overrides)."""
    path: str | None = None
    """A file, a directory (every file in it, sorted) or a glob; exclusive with ``builtin``."""
    builtin: str | None = None
    """A built-in domain: prose, code or arithmetic (see ``moeforge.data.builtin``)."""
    weight: float = 1.0
    """Mixture proportion (normalised over all domains); must be >= 0."""
    format: str = "auto"
    """File format: text (one document per file), jsonl (one record per line), datasets (the
    ``datasets`` library on local json/csv/parquet/arrow files), or auto (by file extension)."""
    kind: str = "auto"
    """text (packed continual pre-training) or chat (SFT, loss on assistant tokens only);
    auto: chat when the records hold ``messages``/``conversations`` or prompt/response fields are set."""
    text_field: str = "text"
    """JSONL/datasets field holding a document's text (kind text)."""
    prompt_field: str | None = None
    """Field holding the user prompt of a single-turn record (e.g. GSM8K's ``question``)."""
    response_field: str | None = None
    """Field holding the assistant answer of a single-turn record (e.g. GSM8K's ``answer``)."""
    system_prompt: str | None = None
    """Optional system message prepended to every chat example."""
    valid_path: str | None = None
    """Separate validation data; when unset, every round(1/valid_fraction)-th block is held out."""
    valid_fraction: float = 0.05
    """Fraction of blocks held out for validation when ``valid_path`` is unset (0 disables).
    Built-in domains have a fixed split instead (every fifth document held out); for them only 0
    (no validation) differs from the default."""
    max_tokens: int | None = None
    """Read documents until this many tokens (train and validation split together); None reads everything."""
    pack: bool | None = None
    """Chat only: pack several examples per block instead of one padded example per block (blocks
    holding no assistant token are left out)."""

    def __post_init__(self) -> None:
        require(
            isinstance(self.name, str) and self.name.strip() != "" and not any(c in self.name for c in "./\\"),
            f"data source name must be a non-empty string without dots or slashes (it names cache folders, metrics "
            f"and --data.NAME overrides), got {self.name!r}.",
        )
        require(
            self.path is None or (isinstance(self.path, str) and self.path.strip() != ""),
            f"data source {self.name!r} has an empty `path`; give a file, directory or glob (or use `builtin`).",
        )
        require(
            (self.path is None) != (self.builtin is None),
            f"data source {self.name!r} needs exactly one of `path` (a file, directory or glob) or "
            f"`builtin` (prose, code, arithmetic); got path={self.path!r}, builtin={self.builtin!r}.",
        )
        if self.builtin is not None:
            from ..data.builtin import BUILTIN_DOMAINS

            if self.builtin not in BUILTIN_DOMAINS:
                raise MoeforgeError(
                    f"data source {self.name!r}: unknown built-in domain {self.builtin!r}."
                    f"{closest(self.builtin, BUILTIN_DOMAINS)} Built-in domains: {', '.join(sorted(BUILTIN_DOMAINS))}."
                )
        require(
            isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight >= 0,
            f"data source {self.name!r} has weight {self.weight!r}; weights must be finite and >= 0.",
        )
        _choice(f"data.{self.name}.format", self.format, FORMATS)
        _choice(f"data.{self.name}.kind", self.kind, KINDS)
        require(
            (self.prompt_field is None) == (self.response_field is None),
            f"data source {self.name!r}: set both prompt_field and response_field (e.g. question/answer "
            "for GSM8K) or neither.",
        )
        if self.prompt_field is not None and self.kind == "text":
            raise MoeforgeError(
                f"data source {self.name!r}: prompt_field/response_field make chat examples; set kind: chat (or auto)."
            )
        require(
            0.0 <= self.valid_fraction <= 0.5,
            f"data source {self.name!r}: valid_fraction must be in [0, 0.5], got {self.valid_fraction}.",
        )
        if self.max_tokens is not None:
            require(self.max_tokens > 0, f"data source {self.name!r}: max_tokens must be > 0, got {self.max_tokens}.")


@dataclass
class MixtureConfig:
    """How the next batch's domains are chosen.

    ``static``: fixed proportions (the normalised ``weight`` of each source).
    ``dynamic``: Sheared-LLaMA's dynamic batch loading (Xia et al. 2024, sec. 2.2; as LLaMA-MoE
    uses it): every ``update_every`` steps, with per-domain losses l and reference losses l_ref,
    w <- (1 - c) * softmax(log w + eta * (l - l_ref)) + c / K.
    """

    type: str = "static"
    """static or dynamic."""
    update_every: int = 100
    """dynamic: steps between weight updates."""
    eta: float = 1.0
    """dynamic: step size of the exponentiated update (Sheared-LLaMA: 1)."""
    c: float = 1e-4
    """dynamic: smoothing toward uniform (Sheared-LLaMA / DoReMi: 1e-4)."""
    reference_model: str | None = None
    """dynamic: model (path or alias, e.g. the dense model a MoE was converted from) whose
    per-domain validation loss is the reference; computed once at the start."""
    reference_losses: dict[str, float] | None = None
    """dynamic: explicit reference loss per domain name (instead of ``reference_model``).
    With neither, the reference is the trained model's own validation loss at step 0."""
    signal: str = "valid"
    """dynamic: which per-domain loss drives the update: validation loss on each domain's held-out
    slice (valid) or the mean training loss since the last update (train, as LLaMA-MoE does)."""
    clip_excess: bool = False
    """dynamic: use max(l - l_ref, 0) as in the Sheared-LLaMA paper instead of the signed difference."""
    eval_tokens: int = 16384
    """dynamic with signal valid: validation tokens per domain for each update."""

    def __post_init__(self) -> None:
        _choice("mixture.type", self.type, MIXTURES)
        _choice("mixture.signal", self.signal, SIGNALS)
        require(self.update_every > 0, f"mixture.update_every must be > 0, got {self.update_every}.")
        require(math.isfinite(self.eta) and self.eta >= 0, f"mixture.eta must be finite and >= 0, got {self.eta}.")
        require(0.0 <= self.c < 1.0, f"mixture.c must be in [0, 1), got {self.c}.")
        require(self.eval_tokens > 0, f"mixture.eval_tokens must be > 0, got {self.eval_tokens}.")
        if self.reference_model is not None and self.reference_losses is not None:
            raise MoeforgeError("mixture: set reference_model or reference_losses, not both.")


@dataclass
class DistillConfig:
    """Knowledge distillation from a teacher (e.g. the dense model a MoE was converted from).

    loss = (1 - weight) * CE + weight * T^2 * KL(p_teacher^T || p_student^T), averaged over the
    tokens that carry loss (Hinton et al. 2015, with the T^2 gradient correction).
    """

    teacher: str | None = None
    """Teacher model path or alias; None disables distillation."""
    weight: float = 0.5
    """Share of the KL term in [0, 1]."""
    temperature: float = 1.0
    """Softmax temperature T applied to both logits."""

    def __post_init__(self) -> None:
        require(0.0 <= self.weight <= 1.0, f"distill.weight must be in [0, 1], got {self.weight}.")
        require(self.temperature > 0, f"distill.temperature must be > 0, got {self.temperature}.")


@dataclass
class TaskEvalConfig:
    """Task accuracy measured during training (:mod:`moeforge.eval.tasks`, as ``moeforge eval --task``),
    at every ``eval_every`` evaluation and at the end; results go to metrics.jsonl as ``kind: tasks``."""

    tasks: list[str] = field(default_factory=list)
    """Task names (arithmetic, arithmetic-choice, gsm8k) or .jsonl task files; empty: none."""
    limit: int = 100
    """Problems per task."""
    shots: int = 0
    """Solved examples shown before each problem."""
    chat: str = "auto"
    """Generation prompts through the tokenizer's chat template: auto, on or off."""
    max_new_tokens: int | None = None
    """Tokens generated per problem (default: the task's)."""
    batch_size: int = 8
    """Problems per forward pass."""

    def __post_init__(self) -> None:
        from ..eval.tasks import CHAT_MODES

        require(isinstance(self.tasks, list) and all(isinstance(t, str) and t.strip() for t in self.tasks),
                f"eval_tasks.tasks must be a list of task names or files, got {self.tasks!r}.")
        require(len(set(self.tasks)) == len(self.tasks), f"eval_tasks.tasks names a task twice: {self.tasks}.")
        for name in ("limit", "batch_size"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0, f"eval_tasks.{name} must be a positive integer, got {value!r}.")
        require(isinstance(self.shots, int) and self.shots >= 0, f"eval_tasks.shots must be >= 0, got {self.shots!r}.")
        require(self.max_new_tokens is None or self.max_new_tokens > 0,
                f"eval_tasks.max_new_tokens must be > 0, got {self.max_new_tokens}.")
        _choice("eval_tasks.chat", self.chat, CHAT_MODES)


@dataclass
class TrainConfig:
    """A training run. Field docstrings double as ``moeforge train --help`` text."""

    model: str
    """Model to train: a path or alias (smollm2)."""
    output_dir: str
    """Where checkpoints, metrics.jsonl, plots and the final model go; rerunning resumes here."""
    data: list[DataSource]
    """Domains: a list of {name, path | builtin, weight, ...}."""
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    """Mixture sampling: static or dynamic (Sheared-LLaMA)."""
    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 8
    """Global batch in sequences per optimizer step (over all processes and accumulation)."""
    micro_batch_size: int | None = None
    """Sequences per forward pass per process; default batch_size / processes (no accumulation)."""
    seq_len: int = 512
    """Tokens per packed block (chat examples are truncated/padded to it)."""
    lr: float = 2e-4
    """Peak learning rate (LLaMA-MoE CPT: 2e-4)."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of lr (LLaMA-MoE: 0.1)."""
    warmup_steps: int = 10
    """Linear warmup steps from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to norms, biases or routers' bias buffers)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping threshold; 0 disables."""
    device: str = "auto"
    """Where to train: auto (a CUDA GPU when there is one, else the CPU), cpu, or cuda. Under
    torchrun each process takes the GPU of its local rank."""
    precision: str = "auto"
    """fp32, bf16 (autocast; weights stay fp32) or auto (bf16 on GPUs that support it, fp32 on CPU)."""
    attention: str = "auto"
    """Attention kernel for training: blocked (moeforge's block-causal attention,
    :mod:`moeforge.models.attention`: on a 2-core AMD EPYC 1.5x faster than SDPA's forward+backward at
    SmolLM2's shape, for 40 MB more memory per layer at 8 x 512; padding, long sequences and GPUs
    still take SDPA), model (the model's own implementation, e.g. sdpa) or auto (blocked on the
    CPU for models running transformers' sdpa attention, model elsewhere)."""
    train_params: str = "auto"
    """What trains: all, moe (experts + routers of MoE layers), router (routers only); auto = all,
    or what the peft/compose wrapper leaves trainable."""
    aux_loss_scale: float = 1.0
    """Multiplier on every router aux loss (routers already apply their own coefficient); 0 turns them off."""
    aux_loss_scales: dict[str, float] = field(default_factory=dict)
    """Per-loss multipliers by name, e.g. {z_loss: 0.5, balance_loss: 2.0} (times aux_loss_scale)."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Optional KL distillation from a teacher."""
    save_every: int = 100
    """Steps between checkpoints (a checkpoint is always written at the last step)."""
    keep_last: int = 2
    """Checkpoints kept on disk."""
    log_every: int = 10
    """Steps between metrics.jsonl records."""
    eval_every: int = 0
    """Steps between per-domain validation evaluations (0: only at the end)."""
    eval_tokens: int = 16384
    """Validation tokens per domain per evaluation."""
    eval_tasks: TaskEvalConfig = field(default_factory=TaskEvalConfig)
    """Task accuracy at each evaluation: {tasks: [arithmetic-choice, ...], limit, shots, chat, ...}."""
    seed: int = 0
    """Seed of model-side randomness (dropout, router noise); the data order is seed-determined too."""
    resume: bool = True
    """Resume from the latest checkpoint in output_dir when there is one."""
    overwrite: bool = False
    """Start fresh, replacing the run in output_dir (kept aside until this run's first checkpoint, put back if it fails before)."""
    progress: bool = True
    """Show a progress bar (tokens/s, loss, aux loss, ETA) on stderr."""
    plots: bool = True
    """Write PNG plots (loss, per-domain loss, domain weights, expert load) to output_dir."""
    save_final: bool = True
    """Save the trained model to output_dir/final at the end."""
    cache_dir: str | None = None
    """Token cache directory; default $MOEFORGE_CACHE/tokens (~/.cache/moeforge/tokens); 'off' disables."""
    tokenizer: str | None = None
    """Tokenizer path or alias when it differs from ``model``."""
    chat_template: str | None = None
    """Chat template (Jinja) for tokenizers without one, or 'chatml'."""
    separator: str | None = None
    """Token placed between packed documents; default the tokenizer's EOS token."""
    parallel: str = "ddp"
    """Multi-process strategy under torchrun: ddp (replicate) or fsdp (FSDP2 sharding per decoder layer)."""
    find_unused_parameters: bool = False
    """DDP: allow trainable parameters that get no gradient in a step."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% slower)."""
    fused_cross_entropy: bool = True
    """Compute the LM head and next-token loss together in chunks, never materialising the (tokens, vocab)
    logits (single process, fp32, no distillation/peft/compose; otherwise the plain path is used)."""
    peft: dict[str, Any] | None = None
    """Parameter-efficient MoE section, passed to moeforge.peft.wrap_from_config."""
    compose: dict[str, Any] | None = None
    """Composition (CALM) section, passed to moeforge.compose.compose_from_config."""

    def __post_init__(self) -> None:
        require(isinstance(self.data, list) and len(self.data) > 0, "config needs at least one data source under `data`.")
        names = [d.name for d in self.data]
        dup = sorted({n for n in names if names.count(n) > 1})
        require(not dup, f"data source names must be unique; repeated: {', '.join(dup)}.")
        total = sum(d.weight for d in self.data)
        require(
            total > 0,
            f"data weights sum to {total}; give at least one domain a positive weight.",
        )
        for name in ("steps", "batch_size", "seq_len", "save_every", "keep_last", "log_every", "eval_tokens"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}.")
        require(self.seq_len >= 2, f"seq_len must be >= 2, got {self.seq_len}.")
        require(self.output_dir.strip() != "", "output_dir is empty; name the directory the run writes to.")
        require(self.cache_dir is None or self.cache_dir.strip() != "",
                "cache_dir is empty (it would cache tokens in the current directory); name a directory, "
                "write 'off' to disable the token cache, or leave it out for the default.")
        require(self.model.strip() != "", "model is empty; give a path or alias (e.g. smollm2).")
        require(self.eps > 0, f"eps must be > 0 (AdamW's denominator term), got {self.eps}.")
        require(0 <= self.seed < 2**63, f"seed must be an integer in [0, 2^63), got {self.seed}.")
        if self.micro_batch_size is not None:
            require(self.micro_batch_size > 0, f"micro_batch_size must be > 0, got {self.micro_batch_size}.")
        require(self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}.")
        require(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}.")
        require(math.isfinite(self.lr) and self.lr > 0, f"lr must be a positive number, got {self.lr}.")
        require(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")
        require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}.")
        require(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            f"betas must be two numbers in [0, 1), got {self.betas}.",
        )
        require(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}.")
        _choice("precision", self.precision, PRECISIONS)
        _choice("device", self.device, DEVICES)
        _choice("train_params", self.train_params, TRAIN_PARAMS)
        _choice("parallel", self.parallel, PARALLEL)
        _choice("attention", self.attention, ATTENTION)
        require(self.aux_loss_scale >= 0, f"aux_loss_scale must be >= 0, got {self.aux_loss_scale}.")
        for k, v in self.aux_loss_scales.items():
            require(k in AUX_LOSS_NAMES, f"aux_loss_scales has no loss {k!r}; the routers' losses are "
                    f"{', '.join(AUX_LOSS_NAMES)}.{closest(str(k), AUX_LOSS_NAMES)}")
            require(isinstance(v, (int, float)) and v >= 0, f"aux_loss_scales.{k} must be a number >= 0, got {v!r}.")
        if self.peft is not None and self.compose is not None:
            raise MoeforgeError("a config may have a `peft` section or a `compose` section, not both.")
        # the sections' own checks, now rather than after the model has loaded
        if self.peft is not None:
            from ..peft.config import config_from_dict

            config_from_dict(self.peft, where="the peft section")
        if self.compose is not None:
            from ..compose.build import check_section

            check_section(self.compose)
        if (self.peft is not None or self.compose is not None) and self.train_params != "auto":
            section = "peft" if self.peft is not None else "compose"
            raise MoeforgeError(
                f"train_params={self.train_params!r} conflicts with the `{section}` section, which decides what "
                "trains; remove train_params (or set it to auto)."
            )
        m = self.mixture
        if m.reference_losses is not None:
            missing = sorted(set(names) - set(m.reference_losses))
            extra = sorted(set(m.reference_losses) - set(names))
            require(
                not missing and not extra,
                f"mixture.reference_losses must name every domain exactly: missing {missing}, unknown {extra}.",
            )
        if m.type == "dynamic":
            require(
                len(self.data) >= 2,
                "mixture.type dynamic needs at least two data domains to move weight between; use static.",
            )
            if m.signal == "valid":
                for d in self.data:
                    require(
                        d.valid_path is not None or d.valid_fraction > 0,
                        f"mixture signal 'valid' needs validation data for domain {d.name!r}; "
                        "set its valid_fraction > 0 or valid_path, or use mixture.signal: train.",
                    )

    # ------------------------------------------------------------------ helpers
    @property
    def domain_names(self) -> list[str]:
        return [d.name for d in self.data]

    @property
    def weights(self) -> list[float]:
        """Initial mixture weights, normalised to sum to 1."""
        total = sum(d.weight for d in self.data)
        return [d.weight / total for d in self.data]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a plain dict; unknown keys are refused with the closest valid key."""
        return _build(cls, data, "")

    def replace(self, **changes: Any) -> TrainConfig:
        d = self.to_dict()
        for k, v in changes.items():
            d[k] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
        return TrainConfig.from_dict(d)


# ---------------------------------------------------------------------------------- loading
def load_config(source: str | Path | dict[str, Any], overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML file (or take a dict), apply overrides, validate.

    Args:
        source: path of a YAML file, or the config as a dict.
        overrides: ``["--lr", "1e-4", "--mixture.eta=0.5"]`` (CLI form) or ``{"lr": 1e-4, "mixture.eta": 0.5}``.
    """
    if isinstance(source, dict):
        data = _deepcopy(source)
    else:
        data = read_yaml(source)
    if overrides:
        pairs = parse_overrides(overrides) if isinstance(overrides, list) else list(overrides.items())
        for key, value in pairs:
            apply_override(data, key, value)
    return TrainConfig.from_dict(data)


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if p.is_dir():
        raise MoeforgeError(f"{p} is a directory; pass the path of a YAML training config file (see configs/).")
    if not p.is_file():
        raise MoeforgeError(f"config file {p} not found; pass the path of a YAML training config (see configs/).")
    try:
        data = yaml.load(p.read_text(), Loader=_unique_key_loader())  # noqa: S506  (a SafeLoader subclass)
    except UnicodeDecodeError:
        raise MoeforgeError(f"{p} is not a text file; pass the path of a YAML training config (see configs/).") from None
    except MoeforgeError as err:  # a key set twice
        raise MoeforgeError(f"{p}: {err}") from None
    except yaml.YAMLError as err:
        raise MoeforgeError(f"{p} is not valid YAML: {' '.join(str(err).split())}") from None
    if data is None:
        raise MoeforgeError(f"config file {p} is empty; it needs at least model, output_dir and data (see configs/).")
    if not isinstance(data, dict):
        raise MoeforgeError(f"{p} must hold a mapping of config keys (model, data, steps, ...), got {type(data).__name__}.")
    return data


def _unique_key_loader():
    """yaml's SafeLoader, refusing a mapping that sets one key twice (plain YAML keeps the last silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise MoeforgeError(
                        f"config key {key!r} is set twice (line {key_node.start_mark.line + 1}); keep one of them."
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def parse_value(text: str) -> Any:
    """Parse a command-line value: int, float (``1e-4`` too), bool, null, or YAML ([0.9, 0.95], {...})."""
    import yaml

    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """``["--a.b", "1", "--c=x"]`` -> ``[("a.b", 1), ("c", "x")]``.

    A value is parsed as a number, bool, null or YAML, except for keys whose field is a string
    (paths, names, prompts, separators): those keep the text as given (``null`` still unsets an
    optional one), so ``--output_dir 0123`` is not the number 123 and ``--data.NAME.system_prompt
    "Note: be brief"`` is not a mapping.
    """
    pairs: list[tuple[str, Any]] = []
    for key, text in _split_overrides(args):
        value = parse_value(text)
        if value is not None and _is_text_field(_override_field_type(key)):
            value = text
        pairs.append((key, value))
    return pairs


def _split_overrides(args: list[str]) -> list[tuple[str, str]]:
    """``["--a.b", "1", "--c=x"]`` -> ``[("a.b", "1"), ("c", "x")]`` (keys normalised, values as text)."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise MoeforgeError(f"unexpected argument {arg!r}; overrides look like `--key value` or `--key=value`.")
        key = arg[2:]
        if "=" in key:
            key, text = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args) or (args[i + 1].startswith("--") and len(args[i + 1]) > 2):
                raise MoeforgeError(f"override --{key} needs a value (`--{key} VALUE`, e.g. `--{key} true` for a switch).")
            text = args[i + 1]
            i += 2
        pairs.append((_normalise_key(key), text))
    return pairs


#: dotted keys whose next part is a data source's name, kept as written (names may hold hyphens)
_NAMED_BY_DOMAIN = ("data", "mixture.reference_losses")


def _normalise_key(key: str) -> str:
    """``micro-batch-size`` -> ``micro_batch_size`` in config field names, but never in a data source's
    name (``--data.my-code.weight``, ``--mixture.reference_losses.my-code``)."""
    out: list[str] = []
    for part in key.split("."):
        out.append(part if ".".join(out) in _NAMED_BY_DOMAIN else part.replace("-", "_"))
    return ".".join(out)


def _section_field_type(section: str, name: str) -> Any:
    """The declared type of ``name`` in the free-form ``peft:`` or ``compose:`` section (the
    settings of every adapter method, or of CALM; paths are strings), None when unknown."""
    if section == "compose":
        from ..compose.config import CALMConfig

        if name in ("augmenting", "init_from"):
            return str
        return typing.get_type_hints(CALMConfig).get(name)
    from ..peft.config import PEFT_CONFIGS

    if name == "method":
        return str
    types_ = {typing.get_type_hints(cls).get(name) for cls in PEFT_CONFIGS.values()} - {None}
    return types_.pop() if len(types_) == 1 else None


def _override_field_type(key: str) -> Any:
    """The declared type of the config field a dotted override key sets; None when it is not a field
    (a section, a data source as a whole, a key inside a free-form mapping, an unknown key)."""
    parts = key.split(".")
    if len(parts) == 2 and parts[0] in ("peft", "compose"):
        return _section_field_type(parts[0], parts[1])
    cls: Any = TrainConfig
    i = 0
    while i < len(parts):
        hints = typing.get_type_hints(cls)
        if parts[i] not in hints:
            return None
        tp = hints[parts[i]]
        i += 1
        if i == len(parts):
            return tp
        inner = _without_none(tp)
        if dataclasses.is_dataclass(inner):
            cls = inner
        elif typing.get_origin(inner) is list and typing.get_args(inner) == (DataSource,):
            i += 1  # the source's name or index
            cls = DataSource
        else:
            return None
    return None


def _without_none(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return tp


def _is_text_field(tp: Any) -> bool:
    return tp is not None and _without_none(tp) is str


def apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` in the raw config dict; ``data.<index|name>.field`` addresses a data source."""
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node = _list_item(node, part, where)
            continue
        if part not in node or node[part] is None:
            _check_key(part, parts[:depth], where)
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        idx = _list_index(node, last, key)
        node[idx] = value
        return
    if not isinstance(node, dict):
        raise MoeforgeError(f"cannot set --{key}: {'.'.join(parts[:-1])} is not a section.")
    node[last] = value


def _list_index(items: list, part: str, where: str) -> int:
    """The entry ``part`` names: a data source of that name (so all-digit names work), else an index."""
    names = [it.get("name") if isinstance(it, dict) else None for it in items]
    if part in names:
        return names.index(part)
    if part.isdigit():
        idx = int(part)
        if idx >= len(items):
            raise MoeforgeError(f"--{where}: index {idx} is out of range; the list has {len(items)} entries.")
        return idx
    raise MoeforgeError(f"--{where}: no data source named {part!r}.{closest(part, [n for n in names if n])}")


def _list_item(items: list, part: str, where: str) -> Any:
    return items[_list_index(items, part, where)]


_SECTIONS = {"mixture": MixtureConfig, "distill": DistillConfig}


def _check_key(part: str, parents: list[str], where: str) -> None:
    """Refuse an override that creates an unknown section."""
    if parents:
        return  # deeper keys are checked when the dataclass is built
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    if part not in names:
        raise MoeforgeError(f"unknown config key {where!r}.{_key_hint(part, names, '')}")


def _key_hint(key: str, names, prefix: str) -> str:
    """The closest valid key, or when none is close, the section's keys (the top level's are many: --help)."""
    hint = closest(key, names, prefix)
    if hint:
        return hint
    names = sorted(names)
    if prefix and len(names) <= 20:
        return f" Keys under {prefix.rstrip('.')}: {', '.join(names)}."
    return " `moeforge train --help` lists the config keys."


# ------------------------------------------------------------------------------- dataclass build
def _build(cls: type, data: Any, prefix: str):
    if dataclasses.is_dataclass(data):
        return data
    if not isinstance(data, dict):
        what = prefix.rstrip(".") or "config"
        raise MoeforgeError(f"{what} must be a mapping of keys, got {data!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise MoeforgeError(f"unknown config key {prefix + str(key)!r}.{_key_hint(str(key), fields, prefix)}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in kwargs]
    if missing:
        raise MoeforgeError(f"config is missing required key(s) {', '.join(prefix + m for m in missing)}.")
    return cls(**kwargs)


def _source_label(item: Any, index: int) -> str:
    """How messages name data source ``index``: its name when it has one (as overrides address it)."""
    name = item.get("name") if isinstance(item, dict) else None
    return name if isinstance(name, str) and name else str(index)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key)
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise MoeforgeError(f"config key {key!r} expects a list, got {value!r}.")
        (item,) = args
        if item is DataSource:
            return [_build(DataSource, v, f"{key}.{_source_label(v, i)}.") for i, v in enumerate(value)]
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise MoeforgeError(f"config key {key!r} expects a mapping, got {value!r}.")
        if args and args[1] is float:
            return {k: _coerce(v, float, f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise MoeforgeError(f"config key {key!r} expects true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool):
            raise MoeforgeError(f"config key {key!r} expects an integer, got {value!r}.")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        if not isinstance(value, int):
            raise MoeforgeError(f"config key {key!r} expects an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise MoeforgeError(f"config key {key!r} expects a number, got {value!r}.")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise MoeforgeError(f"config key {key!r} expects a number, got {value!r}.") from None
        if not math.isfinite(number):
            raise MoeforgeError(f"config key {key!r} expects a finite number, got {value!r}.")
        return number
    if tp is str:
        if value is None or isinstance(value, (dict, list)):
            raise MoeforgeError(f"config key {key!r} expects a string, got {'nothing' if value is None else repr(value)}.")
        return str(value)
    return value


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise MoeforgeError(f"{key} must be one of {', '.join(choices)}, got {value!r}.{closest(str(value), choices)}")


def _deepcopy(d):
    import copy

    return copy.deepcopy(d)


def config_help() -> str:
    """One line per config key with its docstring (for ``moeforge train --help``)."""
    import ast
    import inspect

    def docs(cls) -> dict[str, str]:
        src = inspect.getsource(cls)
        tree = ast.parse(src)
        out: dict[str, str] = {}
        body = tree.body[0].body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(getattr(b, "value", None), ast.Constant):
                out[a.target.id] = " ".join(str(b.value.value).split())
        return out

    lines = []
    for prefix, cls in (("", TrainConfig), ("mixture.", MixtureConfig), ("distill.", DistillConfig), ("data[].", DataSource)):
        for name, doc in docs(cls).items():
            lines.append(f"  {prefix + name}: {doc}")
    return "\n".join(lines)
