"""The one trainer behind every moeforge training mode (CPT, SFT, PEFT-MoE, CALM composition).

``train(config) -> TrainResult`` runs a whole job: load the model and tokenizer, apply the
``peft``/``compose`` wrapper or ``train_params``, build the domain data, resume from the latest
checkpoint in ``output_dir`` if there is one, and loop:

1. the sampler picks the global batch's blocks by the mixture weights (identically on every
   process); each process takes its slice and splits it into micro-batches;
2. each micro-batch's loss is its summed next-token loss divided by the number of target
   tokens in the whole global batch (so accumulation and processes give the gradient of one big
   batch), plus the router aux losses (times the trainer's multipliers) averaged over
   micro-batches, plus the optional KL distillation term;
3. gradients are clipped, AdamW steps with the warmup+cosine learning rate, and
   ``moeforge.moe.update_router_biases`` applies the aux-loss-free bias updates (loads summed
   over processes first);
4. on schedule: metrics records, per-domain evaluation, dynamic mixture updates, checkpoints.

A non-finite loss or gradient stops the run with a clear message, leaving the last good
checkpoint in place. The final model goes to ``output_dir/final`` (``save_trained`` when the
model has it, else ``save_pretrained`` plus the tokenizer).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import MoeforgeError
from ..models.attention import use_block_attention
from ..utils.memory import tune_cpu_allocator
from . import checkpoint as ckpt
from .config import TrainConfig, load_config
from .distributed import DistContext, clear_dtensor_caches, no_sync, setup, sync_router_loads, teardown, wrap_model
from .fused_ce import linear_cross_entropy
from .losses import distillation_kl, shifted_targets, token_cross_entropy, weighted_aux_loss
from .metrics import MetricsWriter, read_metrics, write_plots
from .mixture import Mixture
from .params import count_parameters, prepare_model
from .schedule import lr_at

FINAL_DIR = "final"
CONFIG_FILE = "train_config.yaml"
PLOT_INTERVAL_S = 60.0


@dataclass
class TrainResult:
    """What a finished (or already complete) run produced."""

    output_dir: Path
    final_dir: Path | None
    steps: int
    """Optimizer steps completed."""
    resumed_from: int | None
    """Step of the checkpoint this invocation resumed from, if any."""
    final_loss: float | None
    """Last logged training next-token loss."""
    eval_losses: dict[str, float]
    """Per-domain validation loss at the end."""
    weights: dict[str, float]
    """Final mixture weights."""
    tokens: int
    """Tokens fed to the model (all processes, padding excluded)."""
    wall_time_s: float
    metrics_path: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    """All metrics.jsonl records."""
    model: nn.Module | None = None
    """The trained model in memory (this process's replica); None under ``parallel: fsdp`` with
    several processes, whose shards die with the process group (load ``final_dir`` instead)."""


def train(
    config: TrainConfig | dict | str | os.PathLike,
    *,
    overrides: list[str] | dict[str, Any] | None = None,
    model: nn.Module | None = None,
    tokenizer=None,
    callbacks: list[Any] | tuple = (),
) -> TrainResult:
    """Run a training job.

    Args:
        config: a :class:`TrainConfig`, a dict, or the path of a YAML config.
        overrides: ``{"lr": 1e-4, "mixture.eta": 0.5}`` or CLI-style ``["--lr", "1e-4"]``.
        model: an already-built model to train instead of loading ``config.model``
            (``config.model`` is then only a label, unless the tokenizer is loaded from it).
        tokenizer: the tokenizer to use instead of loading ``config.tokenizer or config.model``.
        callbacks: objects with any of ``on_step_end(trainer, step, stats)``, ``on_log(trainer, record)``,
            ``on_eval(trainer, record)``, ``on_save(trainer, step, path)``, ``on_train_end(trainer, result)``;
            setting ``trainer.should_stop = True`` ends the run after the current step (with a checkpoint).
    Returns:
        :class:`TrainResult`.
    """
    if isinstance(config, TrainConfig):
        cfg = config if not overrides else load_config(config.to_dict(), overrides)
    else:
        cfg = load_config(config, overrides)
    return Trainer(cfg, model=model, tokenizer=tokenizer, callbacks=callbacks).run()


class Trainer:
    """One training run; see :func:`train` (the stable entry point)."""

    def __init__(self, config: TrainConfig, *, model=None, tokenizer=None, callbacks=()) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise MoeforgeError(
                f"train(model=...) takes a loaded model object, got a {type(model).__name__}; to train from a "
                "path or alias, set it as the config's `model` instead."
            )
        if isinstance(tokenizer, (str, os.PathLike)):
            from ..loading import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        if model is not None and tokenizer is None and not config.tokenizer:
            from ..loading import resolve

            try:
                resolve(config.model)
            except MoeforgeError:
                raise MoeforgeError(
                    f"train(model=...) was given a model object and config model {config.model!r} is only a label "
                    "(no such path or alias), so no tokenizer can be loaded from it; pass tokenizer=... or set "
                    "`tokenizer:` in the config."
                ) from None
        if callbacks is None:
            callbacks = ()
        elif not isinstance(callbacks, (list, tuple)):
            callbacks = (callbacks,)  # one callback object
        self.config = config
        self._given_model = model
        self._given_tokenizer = tokenizer
        self.callbacks = list(callbacks)
        self.should_stop = False
        self.step = 0
        self.tokens = 0
        self.output_dir = Path(config.output_dir).expanduser()
        self._replaced: Path | None = None  # an overwritten run, moved aside until this one has a checkpoint
        self._created = False  # output_dir was absent or empty: a failure before the first checkpoint removes it

    # =========================================================================== setup
    def _callback(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(self, *args)

    def _inspect_output_dir(self) -> Path | None:
        """Check output_dir without changing it and return the checkpoint to resume from.

        Nothing is deleted or written here: the directory is claimed (:meth:`_claim_output_dir`)
        only once the model, the data and any checkpoint have been checked, so a config mistake
        never costs an existing run.
        """
        from ..utils.io import check_writable_dir

        cfg, out = self.config, self.output_dir
        check_writable_dir(out, "output_dir")
        for what, name in self._input_paths():
            path = Path(name).expanduser()
            if path.exists() and _within(path, out):
                raise MoeforgeError(
                    f"the {what} {name} lies inside output_dir {out}, which this run writes (and --overwrite "
                    "deletes); choose an output_dir outside it."
                )
        if out.is_dir():
            markers = [out / ckpt.CHECKPOINTS, out / "metrics.jsonl", out / CONFIG_FILE]
            if any(out.iterdir()) and not any(m.exists() for m in markers):
                raise MoeforgeError(
                    f"output_dir {out} holds other files and is not a moeforge training directory; "
                    f"{'refusing to delete it' if cfg.overwrite else 'refusing to write into it'}. Choose a new or "
                    "empty output_dir."
                )
        if cfg.overwrite and out.is_dir():
            return None
        latest = ckpt.latest_checkpoint(out) if out.is_dir() else None
        if latest is None and (out / FINAL_DIR).is_dir():
            # its checkpoints were deleted (to free disk): a fresh start would replace its model and metrics
            raise MoeforgeError(
                f"output_dir {out} holds a finished run's model ({FINAL_DIR}/) but no checkpoint to resume from; "
                "training again would start over and replace it. Choose a new output_dir, or pass --overwrite true "
                "to start over."
            )
        if latest is not None and not cfg.resume:
            raise MoeforgeError(
                f"{out} already holds checkpoints (latest {latest.name}) and resume is off; "
                "pass --resume true to continue it, --overwrite true to start over, or choose another output_dir."
            )
        return latest

    def _input_paths(self) -> list[tuple[str, str]]:
        """(what, path) of every model or tokenizer the config reads from disk."""
        cfg = self.config
        named = [("model", cfg.model), ("tokenizer", cfg.tokenizer), ("distillation teacher", cfg.distill.teacher),
                 ("mixture reference model", cfg.mixture.reference_model)]
        if isinstance(cfg.compose, dict):
            named += [("augmenting model", cfg.compose.get("augmenting")), ("composition", cfg.compose.get("init_from"))]
        return [(what, name) for what, name in named if isinstance(name, str) and name]

    def _claim_output_dir(self) -> None:
        """Create output_dir and record this run's config (main process).

        With ``overwrite`` the old run is moved aside, not deleted: it is deleted once this run has
        written its first checkpoint, and put back if this run fails (or is interrupted) before
        that (:meth:`_settle_output_dir`). A directory this run created is removed on such a failure.
        """
        cfg, out = self.config, self.output_dir
        error = ""
        if self.ctx.is_main:
            import yaml

            from ..utils.io import atomic_write_text

            try:
                if cfg.overwrite and out.exists():
                    aside = out.parent / f".{out.name}.replaced-{os.getpid()}"
                    shutil.rmtree(aside, ignore_errors=True)
                    out.rename(aside)
                    self._replaced = aside
                elif not out.exists() or not any(out.iterdir()):
                    self._created = True  # nothing of value there: a failure before a checkpoint removes the run
                out.mkdir(parents=True, exist_ok=True)
                atomic_write_text(out / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            except OSError as err:
                error = f"{err.strerror or err}"
        if not self.ctx.all_true(not error):
            raise MoeforgeError(
                f"could not set up output_dir {out}: {error or 'the main process failed'}; choose a writable output_dir."
            )

    def _settle_output_dir(self, succeeded: bool) -> None:
        """Commit (the run has a checkpoint) or undo (it failed before one) :meth:`_claim_output_dir` (main process)."""
        replaced, created = self._replaced, self._created
        self._replaced, self._created = None, False
        if succeeded:
            if replaced is not None:
                shutil.rmtree(replaced, ignore_errors=True)
            return
        if replaced is not None:
            shutil.rmtree(self.output_dir, ignore_errors=True)
            replaced.rename(self.output_dir)
        elif created:
            shutil.rmtree(self.output_dir, ignore_errors=True)  # a folder the user made empty is left empty

    def _load_model(self):
        from ..loading import load, load_tokenizer

        cfg = self.config
        tok = self._given_tokenizer
        if tok is None and cfg.tokenizer is not None:
            try:
                tok = load_tokenizer(cfg.tokenizer)
            except MoeforgeError as err:
                raise MoeforgeError(f"the config's tokenizer: {err} Fix tokenizer: (or leave it out to use the "
                                    "model's own).") from None
        elif tok is None:
            tok = load_tokenizer(cfg.model)
        if cfg.chat_template is not None:
            from ..data.chat import ensure_chat_template

            ensure_chat_template(tok, cfg.chat_template)
        model = self._given_model if self._given_model is not None else load(cfg.model, dtype=torch.float32)
        return model, tok

    def _setup(self) -> Path | None:
        cfg = self.config
        self.ctx: DistContext = setup(device=self.config.device)
        ctx = self.ctx
        world = ctx.world_size
        if cfg.batch_size % world:
            raise MoeforgeError(
                f"batch_size={cfg.batch_size} is not divisible by the {world} processes; use a multiple of {world}."
            )
        self.per_rank = cfg.batch_size // world
        self.micro = cfg.micro_batch_size or self.per_rank
        if self.per_rank % self.micro:
            raise MoeforgeError(
                f"each of the {world} processes gets {self.per_rank} sequences per step, which micro_batch_size="
                f"{self.micro} does not divide; choose a divisor of {self.per_rank}."
            )
        self.accum = self.per_rank // self.micro
        if cfg.parallel == "fsdp" and (cfg.peft is not None or cfg.compose is not None):
            raise MoeforgeError("parallel: fsdp is not supported with a peft/compose section (their weights are small); use ddp.")
        if cfg.parallel == "fsdp" and ctx.distributed and cfg.eval_tasks.tasks:
            raise MoeforgeError("eval_tasks needs the whole model on one process, which parallel: fsdp shards; use ddp, "
                                "or measure the checkpoints with `moeforge eval CHECKPOINT --task NAME`.")
        from ..eval.tasks import resolve_tasks

        self.tasks = resolve_tasks(cfg.eval_tasks.tasks, cfg.eval_tasks.limit)  # bad names fail before loading
        latest = self._inspect_output_dir()

        # model: seeded identically on every process (wrappers initialise new weights)
        _seed_all(cfg.seed)
        model, tok = self._load_model()
        context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(context, int) and cfg.seq_len > context:
            raise MoeforgeError(
                f"seq_len={cfg.seq_len} is longer than the model's context of {context} positions "
                f"(max_position_embeddings); use --seq_len {context} or less."
            )
        self.tokenizer = tok
        if cfg.peft is None and cfg.compose is None:
            _refuse_foreign_moe(model)
        model = prepare_model(model, cfg, tok)
        augmenting = getattr(model, "augmenting", None) if cfg.compose is not None else None
        context = getattr(getattr(augmenting, "config", None), "max_position_embeddings", None)
        if isinstance(context, int) and cfg.seq_len > context:  # a composition runs both models on every token
            raise MoeforgeError(
                f"seq_len={cfg.seq_len} is longer than the augmenting model's context of {context} positions "
                f"(max_position_embeddings); use --seq_len {context} or less."
            )
        _reset_router_loads(model)
        self.trainable, self.total_params = count_parameters(model)
        self.fingerprint = ckpt.model_fingerprint(model)
        self.ckpt_names = ckpt.trainable_names(model)
        if cfg.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            elif hasattr(model, "gradient_checkpointing_enable"):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            else:
                raise MoeforgeError(f"{type(model).__name__} does not support gradient checkpointing; set it to false.")
        model.to(ctx.device)
        use_block_attention(model, cfg.attention, ctx.device)
        if ctx.device.type == "cpu":
            tune_cpu_allocator()  # reuse freed activation/gradient blocks instead of page-faulting them back
        model.train()
        self.model = model  # unwrapped
        self.autocast_dtype = self._autocast_dtype()
        self.routing_kw = _accepts_output_routing(model)
        from ..moe.layer import MoELayer

        # a model with MoE layers is told where the padding is, so its routers leave it out
        self._routes_tokens = any(isinstance(m, MoELayer) for m in model.modules())

        # data: the main process fills the token cache first
        from ..data.dataset import build_domains

        valid_cap = max(cfg.eval_tokens, cfg.mixture.eval_tokens)
        if ctx.is_main:
            self.domains = build_domains(cfg, tok, valid_max_tokens=valid_cap)
        ctx.barrier()
        if not ctx.is_main:
            self.domains = build_domains(cfg, tok, valid_max_tokens=valid_cap)
        for d, src in zip(self.domains, cfg.data):
            if src.weight > 0 and len(d.train) == 0:
                raise MoeforgeError(f"data source {d.name!r} has no training blocks.")
        vocab = _vocab_size(model)
        for d in self.domains:
            top = int(d.train.input_ids.max()) if len(d.train) else 0
            if vocab is not None and top >= vocab:
                raise MoeforgeError(
                    f"data source {d.name!r} has token id {top} but the model's vocabulary has {vocab} entries; "
                    "the tokenizer does not belong to this model (set `tokenizer:`)."
                )

        from ..data.sampler import MixtureSampler

        self.mixture = Mixture(cfg.domain_names, [s.weight for s in cfg.data], cfg.mixture)
        self.sampler = MixtureSampler([len(d.train) for d in self.domains], seed=cfg.seed)

        # teacher for distillation
        self.teacher = None
        if cfg.distill.teacher is not None:
            self.teacher = self._load_frozen(cfg.distill.teacher, "distillation teacher")

        # wrap first: FSDP2 replaces parameters by sharded ones, which the optimizer must hold
        # adapters with top-k routing can leave experts without gradient in a step
        unused = cfg.find_unused_parameters or cfg.peft is not None or cfg.compose is not None
        self.wrapped = wrap_model(model, ctx, strategy=cfg.parallel, find_unused_parameters=unused)
        # optimizer over trainable parameters; weight decay on matrices only, and never on parameters
        # whose neutral value is not zero (modules list them in ``no_weight_decay``: (IA)^3/MoV vectors)
        exempt = {id(getattr(m, name)) for m in self.model.modules() for name in getattr(m, "no_weight_decay", ())}
        decay, no_decay = [], []
        for _, p in self.model.named_parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 and id(p) not in exempt else no_decay).append(p)
        self.params = decay + no_decay
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        # the fused AdamW kernel (one pass per tensor instead of ~10 elementwise ops) runs on CPU and CUDA
        fused = all(p.device.type in ("cpu", "cuda") for p in self.params) and not (cfg.parallel == "fsdp" and ctx.distributed)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)
        self.writer = MetricsWriter(self.output_dir, enabled=ctx.is_main)
        self._reset_window()
        self._train_loss_since_update = self._zeros_domain()
        return latest

    def _load_frozen(self, name: str, what: str) -> nn.Module:
        from ..loading import load

        m = load(name, dtype=torch.float32)
        m.to(self.ctx.device)
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
        ours, theirs = _vocab_size(self.model), _vocab_size(m)
        if ours is not None and theirs is not None and ours != theirs:
            raise MoeforgeError(
                f"the {what} {name!r} has a vocabulary of {theirs} tokens but the trained model has {ours}; "
                "they must share a tokenizer."
            )
        return m

    def _autocast_dtype(self) -> torch.dtype | None:
        p = self.config.precision
        dev = self.ctx.device
        if p == "fp32":
            return None
        if p == "bf16":
            return torch.bfloat16
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.ctx.device.type, dtype=self.autocast_dtype)

    # ========================================================================== resume
    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "sampler": self.sampler.state_dict(),
            "mixture": self.mixture.state_dict(),
            "window": self._window_state(),
            "train_loss_since_update": self._train_loss_since_update.tolist(),
            "fingerprint": self.fingerprint,
            "world_size": self.ctx.world_size,
            "domains": self.config.domain_names,
            "train_data": {d.name: d.train_digest for d in self.domains},
            "config": self.config.to_dict(),
            "time": time.time(),
        }

    def _gather_model_state(self) -> dict[str, torch.Tensor] | None:
        names = set(self.ckpt_names)
        if self.config.parallel == "fsdp" and self.ctx.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return {k: v for k, v in full.items() if k in names} if self.ctx.is_main else None
        if not self.ctx.is_main:
            return None
        sd = self.model.state_dict(keep_vars=False)
        return {k: sd[k].detach().cpu().clone() for k in self.ckpt_names}

    def _gather_optimizer_state(self) -> dict[str, Any] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        if self.config.parallel == "fsdp" and self.ctx.distributed:
            osd = get_optimizer_state_dict(
                self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
            return osd if self.ctx.is_main else None
        if not self.ctx.is_main:
            return None
        return get_optimizer_state_dict(self.model, self.optimizer)

    def save(self) -> Path:
        """Write a checkpoint for the current step (collective)."""
        path = ckpt.save_checkpoint(
            self.output_dir,
            self.step,
            ctx=self.ctx,
            model_state=self._gather_model_state(),
            optimizer_state=self._gather_optimizer_state(),
            trainer_state=self._trainer_state() if self.ctx.is_main else None,
            keep_last=self.config.keep_last,
        )
        if self.ctx.is_main:
            self._settle_output_dir(succeeded=True)  # this run has a checkpoint: an overwritten run goes now
        self._callback("on_save", self.step, path)
        return path

    def _resume(self, path: Path) -> None:
        data = ckpt.load_checkpoint(path, self.ctx.rank)
        state = data["state"]
        if state.get("config") is not None:  # first: a changed setting explains a changed model
            changes = config_changes(state["config"], self.config.to_dict(), moe=self._routes_tokens)
            if changes:
                raise MoeforgeError(
                    f"output_dir {self.output_dir} holds a run (checkpoint {path.name}) trained with a different "
                    f"config: {'; '.join(changes)}. Resuming would splice two runs together; rerun with the "
                    "original values, choose a new output_dir, or pass --overwrite true to start over."
                )
        ckpt.check_fingerprint(state["fingerprint"], self.fingerprint, path)
        if int(state["step"]) > self.config.steps:
            raise MoeforgeError(
                f"output_dir {self.output_dir} already holds a run at step {state['step']}, past steps="
                f"{self.config.steps}; pass --steps {state['step']} or more to continue it, --overwrite true "
                "to start over, or choose a new output_dir."
            )
        tensors = data["model"]
        missing = sorted(set(self.ckpt_names) - set(tensors))
        extra = sorted(set(tensors) - set(self.ckpt_names))
        if missing or extra:
            raise MoeforgeError(
                f"checkpoint {path} does not match the model: missing {missing[:3]}, unexpected {extra[:3]}; "
                "it was written for a different model or train_params."
            )
        fsdp = self.config.parallel == "fsdp" and self.ctx.distributed
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(self.model, tensors, options=opts)
            set_optimizer_state_dict(self.model, self.optimizer, data["optimizer"], options=opts)
        else:
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

            own = self.model.state_dict(keep_vars=True)
            with torch.no_grad():
                for k, v in tensors.items():
                    if tuple(own[k].shape) != tuple(v.shape):
                        raise MoeforgeError(
                            f"checkpoint {path}: tensor {k} has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}; "
                            "it was written for a different model."
                        )
                    own[k].copy_(v.to(own[k].dtype))
            set_optimizer_state_dict(self.model, self.optimizer, data["optimizer"])
        if state["domains"] != self.config.domain_names:
            raise MoeforgeError(
                f"checkpoint {path} was trained on domains {state['domains']}, the config has {self.config.domain_names}; "
                "resume with the same data sources or use a new output_dir."
            )
        self._check_train_data(state.get("train_data"), path)
        self.sampler.load_state_dict(state["sampler"])
        self.mixture.load_state_dict(state["mixture"])
        self._load_window_state(state["window"])
        self._train_loss_since_update = torch.tensor(state["train_loss_since_update"], dtype=torch.float64)
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        if data["rng"] is not None:
            ckpt.set_rng_state(*data["rng"])
        else:
            _seed_all(self.config.seed + 7919 * self.ctx.rank + self.step)
        if self.ctx.is_main:
            self.writer.truncate_after(self.step)

    def _check_train_data(self, saved: dict[str, str] | None, path: Path) -> None:
        """Refuse to resume on training blocks other than the checkpoint's (a data file edited in
        place, whatever its size): the run would go on sampling positions of different data.
        Checkpoints written before the digests were recorded are not checked."""
        if not saved:
            return
        changed = [d.name for d in self.domains if saved.get(d.name) not in (None, d.train_digest)]
        if changed:
            raise MoeforgeError(
                f"the training data of {', '.join(repr(n) for n in changed)} differs from what checkpoint {path.name} "
                f"in {self.output_dir} was trained on (its files were edited); resuming would splice two runs "
                "together. Restore the original files, choose a new output_dir, or pass --overwrite true to start over."
            )

    # ====================================================================== evaluation
    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None, max_tokens: int | None = None) -> dict[str, float]:
        """Per-domain mean next-token loss on the validation slices (all processes share the work)."""
        fsdp = self.config.parallel == "fsdp" and self.ctx.distributed
        if model is None:
            model = self.model
        max_tokens = max_tokens or self.config.eval_tokens
        was_training = model.training
        model.eval()
        results: dict[str, float] = {}
        world, rank = self.ctx.world_size, self.ctx.rank
        for dom in self.domains:
            if dom.valid is None or len(dom.valid) == 0:
                continue
            n = min(len(dom.valid), int(np.searchsorted(np.cumsum(dom.valid.lengths), max_tokens)) + 1)
            batches = [list(range(i, min(i + self.micro, n))) for i in range(0, n, self.micro)]
            mine = batches[rank::world]
            rounds = math.ceil(len(batches) / world) if fsdp else len(mine)
            sums = torch.zeros(2, dtype=torch.float64)
            for r in range(rounds):
                dummy = r >= len(mine)
                idx = batches[0] if dummy else mine[r]
                ids, labels = dom.valid.batch(idx)
                kw = {}
                if self._routes_tokens:  # padding is not routed, as in training
                    from ..data.packing import picks_attention_mask

                    mask = picks_attention_mask([(dom.valid, i) for i in idx], ids.shape[1])
                    if mask is not None:
                        kw["attention_mask"] = mask.long().to(self.ctx.device)
                with self._autocast():
                    out = model(input_ids=ids.to(self.ctx.device), **kw)
                if dummy:
                    continue
                ce, count = token_cross_entropy(out.logits, labels.to(self.ctx.device))
                sums += torch.tensor([ce.sum().item(), count.sum().item()], dtype=torch.float64)
            self.ctx.all_reduce_sum(sums)
            if sums[1] > 0:
                results[dom.name] = float(sums[0] / sums[1])
        model.train(was_training)
        return results

    def evaluate_tasks(self) -> dict[str, dict[str, Any]]:
        """Accuracy on ``eval_tasks`` (:func:`moeforge.eval.tasks.evaluate_task`), name -> {accuracy,
        correct, total[, accuracy_norm]}; the main process measures, the others wait for it."""
        from ..eval.tasks import evaluate_task

        te, results = self.config.eval_tasks, {}
        devices = [self.ctx.device] if self.ctx.device.type == "cuda" else []
        # the training run's random streams are left as they were: it trains the same with or without tasks
        with torch.random.fork_rng(devices=devices, enabled=self.ctx.is_main):
            for task in self.tasks if self.ctx.is_main else ():
                with self._autocast():
                    r = evaluate_task(self.model, self.tokenizer, task, shots=te.shots, chat=te.chat,
                                      batch_size=te.batch_size, max_new_tokens=te.max_new_tokens)
                results[task.name] = {"accuracy": r.accuracy, "correct": r.correct, "total": r.total}
                if r.accuracy_norm is not None:
                    results[task.name]["accuracy_norm"] = r.accuracy_norm
        self.ctx.barrier()
        return results

    def _emit_eval(self, rec: dict[str, Any]) -> None:
        """An evaluation record to metrics.jsonl (main process) and to the callbacks' ``on_eval``."""
        if self.ctx.is_main:
            self.writer.write(rec)
        self._callback("on_eval", rec)

    def _tasks_record(self, final: bool = False) -> dict[str, Any]:
        rec = {"kind": "tasks", "step": self.step, "tasks": self.evaluate_tasks()}
        if final:
            rec["final"] = True
        return rec

    def _eval_record(self, losses: dict[str, float], budget: int | None = None, final: bool = False) -> dict[str, Any]:
        """A metrics record of per-domain validation losses evaluated on up to ``budget`` tokens each
        (``eval_tokens`` by default); ``final`` marks the end-of-run evaluation."""
        budget = self.config.eval_tokens if budget is None else budget
        tok = {d.name: min(d.valid.num_tokens(), budget) for d in self.domains if d.valid is not None}
        total = sum(tok.get(n, 0) for n in losses) or 1
        mean = sum(losses[n] * tok.get(n, 0) for n in losses) / total
        rec = {"kind": "eval", "step": self.step, "loss": mean, "eval": losses, "eval_tokens": budget,
               "weights": self.mixture.as_dict()}
        if final:
            rec["final"] = True
        if self.mixture.reference is not None:
            rec["reference"] = dict(zip(self.mixture.names, self.mixture.reference))
        return rec

    # ========================================================================= logging
    def _zeros_domain(self) -> torch.Tensor:
        return torch.zeros(len(self.config.data), 2, dtype=torch.float64)

    def _reset_window(self) -> None:
        self.w_domain = self._zeros_domain()  # (K, 2) ce sum, target count
        self.w_aux: dict[str, float] = {}
        self.w_aux_total = 0.0
        self.w_kl = 0.0
        self.w_steps = 0
        self.w_tokens = 0
        self.w_time = 0.0
        self.w_grad = 0.0
        self.w_load: dict[int, torch.Tensor] = {}

    def _window_state(self) -> dict[str, Any]:
        return {
            "domain": self.w_domain.tolist(),
            "aux": self.w_aux,
            "aux_total": self.w_aux_total,
            "kl": self.w_kl,
            "steps": self.w_steps,
            "tokens": self.w_tokens,
            "time": self.w_time,
            "grad": self.w_grad,
            "load": {str(k): v.tolist() for k, v in self.w_load.items()},
        }

    def _load_window_state(self, s: dict[str, Any]) -> None:
        self.w_domain = torch.tensor(s["domain"], dtype=torch.float64)
        self.w_aux = dict(s["aux"])
        self.w_aux_total = s["aux_total"]
        self.w_kl = s["kl"]
        self.w_steps = s["steps"]
        self.w_tokens = s["tokens"]
        self.w_time = s["time"]
        self.w_grad = s["grad"]
        self.w_load = {int(k): torch.tensor(v, dtype=torch.float64) for k, v in s["load"].items()}

    def _log_record(self) -> dict[str, Any]:
        ce, count = self.w_domain[:, 0], self.w_domain[:, 1]
        steps = max(1, self.w_steps)
        rec: dict[str, Any] = {
            "kind": "train",
            "step": self.step,
            "loss": float(ce.sum() / count.sum()) if count.sum() > 0 else float("nan"),
            "aux_loss": self.w_aux_total / steps,
            "aux_losses": {k: v / steps for k, v in self.w_aux.items()},
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": self.w_grad / steps,
            "tokens": self.tokens,
            "tokens_per_s": self.w_tokens / self.w_time if self.w_time > 0 else None,
            "domain_loss": {
                n: float(ce[i] / count[i]) for i, n in enumerate(self.config.domain_names) if count[i] > 0
            },
            "weights": self.mixture.as_dict(),
        }
        if self.teacher is not None:
            rec["kl"] = self.w_kl / steps
        if self.w_load:
            rec["expert_load"] = {
                str(k): (v / v.sum()).tolist() if v.sum() > 0 else v.tolist() for k, v in sorted(self.w_load.items())
            }
        return rec

    # ============================================================================ step
    def _forward(self, model, ids: torch.Tensor, mask: torch.Tensor | None = None):
        kw = {} if mask is None else {"attention_mask": mask.long()}
        with self._autocast():
            if self.routing_kw:
                try:
                    return model(input_ids=ids, output_routing=True, **kw)
                except TypeError as err:
                    if "output_routing" not in str(err):
                        raise
                    self.routing_kw = False  # a wrapper that does not pass it through
            return model(input_ids=ids, **kw)

    def _use_fused_ce(self) -> bool:
        """Whether the LM head + loss run fused (:mod:`moeforge.train.fused_ce`) for this run."""
        if not hasattr(self, "_fused_ce"):
            cfg, model = self.config, self.model
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            self._fused_ce = bool(
                cfg.fused_cross_entropy
                and not self.ctx.distributed
                and self.teacher is None
                and cfg.peft is None
                and cfg.compose is None
                and self.autocast_dtype is None
                and isinstance(head, nn.Linear)
                and head.bias is None
                and isinstance(getattr(model, "model", None), nn.Module)
                # families whose logits are exactly lm_head(hidden): others rescale or soft-cap them
                # after the head (Granite's logits_scaling, Cohere's logit_scale, Gemma2's soft-capping)
                and getattr(getattr(model, "config", None), "model_type", None) in PLAIN_HEAD_FAMILIES
            )
        return self._fused_ce

    def _fused_forward(self, ids: torch.Tensor, labels: torch.Tensor, scale: float, mask: torch.Tensor | None = None):
        """Base model forward, then the fused LM head + cross-entropy; returns (out, ce, count, loss)."""
        base = self.model.model
        kw = {} if mask is None else {"attention_mask": mask.long()}
        out = base(input_ids=ids, output_routing=True, **kw) if self.routing_kw else base(input_ids=ids, **kw)
        hidden = out.last_hidden_state
        b, s, h = hidden.shape
        targets = shifted_targets(labels)
        loss, per_token = linear_cross_entropy(
            hidden.reshape(-1, h), self.model.get_output_embeddings().weight, targets.reshape(-1), scale=scale
        )
        ce = per_token.view(b, s).sum(dim=1)
        count = (targets != -100).sum(dim=1)
        return out, ce, count, loss

    def train_step(self) -> dict[str, float]:
        """One optimizer step over the global batch; returns this step's scalar stats."""
        cfg, ctx = self.config, self.ctx
        dev = ctx.device
        t0 = time.perf_counter()
        picks = self.sampler.draw(self.mixture.weights, cfg.batch_size)
        mine = picks[ctx.rank * self.per_rank : (ctx.rank + 1) * self.per_rank]
        from ..data.packing import collate, picks_attention_mask

        micro_batches = []
        for j in range(self.accum):
            chunk = mine[j * self.micro : (j + 1) * self.micro]
            picked = [(self.domains[d].train, i) for d, i in chunk]
            ids, labels = collate(picked)
            # padding (SFT rows, short documents) is kept out of the MoE routing: aux losses, loads, capacity
            mask = picks_attention_mask(picked, ids.shape[1]) if self._routes_tokens else None
            micro_batches.append((ids, labels, torch.tensor([d for d, _ in chunk]), mask))
        counts = torch.tensor(
            [sum(int((lab[:, 1:] != -100).sum()) for _, lab, _, _ in micro_batches),
             sum(int(self.domains[d].train.lengths[i]) for d, i in mine)],
            dtype=torch.float64,
        )
        ctx.all_reduce_sum(counts)
        global_targets, global_tokens = float(counts[0]), int(counts[1])
        if global_targets == 0:
            raise MoeforgeError(f"step {self.step + 1}: the batch has no target tokens (every label is masked); check the data.")
        lm_scale = ctx.world_size / global_targets
        alpha = cfg.distill.weight if self.teacher is not None else 0.0
        step_domain = self._zeros_domain()
        step_aux: dict[str, float] = {}
        step_aux_total = 0.0
        step_kl = 0.0
        finite_flags: list[torch.Tensor] = []
        loads: dict[int, torch.Tensor] = {}
        for j, (ids, labels, dom, mask) in enumerate(micro_batches):
            ids, labels = ids.to(dev), labels.to(dev)
            mask = None if mask is None else mask.to(dev)
            with no_sync(self.wrapped, skip=j < self.accum - 1):
                if self._use_fused_ce():
                    out, ce, count, loss = self._fused_forward(ids, labels, (1.0 - alpha) * lm_scale, mask)
                else:
                    out = self._forward(self.wrapped, ids, mask)
                    ce, count = token_cross_entropy(out.logits, labels)
                    loss = (1.0 - alpha) * ce.sum() * lm_scale
                if self.teacher is not None:
                    with torch.no_grad(), self._autocast():
                        t_logits = self.teacher(input_ids=ids).logits
                    kl = distillation_kl(out.logits, t_logits, labels, cfg.distill.temperature)
                    loss = loss + alpha * kl.sum() * lm_scale
                    step_kl += float(kl.sum().item()) / global_targets  # summed over processes below
                aux, aux_named = weighted_aux_loss(out, cfg.aux_loss_scale, cfg.aux_loss_scales)
                if aux is not None and cfg.aux_loss_scale > 0:
                    loss = loss + aux / self.accum
                finite_flags.append(torch.isfinite(loss.detach()))  # read after the backward: no device sync between the passes
                loss.backward()
            with torch.no_grad():
                for d_i in range(len(self.domains)):
                    sel = dom.to(dev) == d_i
                    if sel.any():
                        step_domain[d_i, 0] += float(ce[sel].sum().item())
                        step_domain[d_i, 1] += float(count[sel].sum().item())
                for k, v in aux_named.items():
                    step_aux[k] = step_aux.get(k, 0.0) + float(v.item()) / self.accum
                if aux is not None:
                    step_aux_total += float(aux.item()) / self.accum
                routing = getattr(out, "routing", None)
                if routing:
                    layers = [(li, r.expert_load()) for li, r in enumerate(routing) if r is not None]
                    if layers:  # one device-to-host copy for all layers
                        host = torch.cat([c for _, c in layers]).to(torch.float64).cpu().split([len(c) for _, c in layers])
                        for (li, _), load in zip(layers, host):
                            loads[li] = loads[li] + load if li in loads else load
        finite = bool(torch.stack(finite_flags).all())
        if not ctx.all_true(finite):
            self._fail_nonfinite("loss")
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.params, float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not math.isfinite(norm):
            self._fail_nonfinite("gradient norm")
        lr = lr_at(self.step, lr=cfg.lr, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        from ..moe.layer import update_router_biases

        sync_router_loads(self.model, ctx)
        update_router_biases(self.model)
        self.step += 1
        self.tokens += global_tokens

        # statistics over processes
        packed = torch.cat([step_domain.reshape(-1), torch.tensor([step_aux_total, step_kl], dtype=torch.float64)])
        ctx.all_reduce_sum(packed)
        k = len(self.domains)
        step_domain = packed[: 2 * k].reshape(k, 2)
        step_aux_total = float(packed[2 * k]) / ctx.world_size
        step_kl = float(packed[2 * k + 1])
        if step_aux:
            names = sorted(step_aux)
            t = torch.tensor([step_aux[n] for n in names], dtype=torch.float64)
            ctx.all_reduce_sum(t)
            step_aux = {n: float(v) / ctx.world_size for n, v in zip(names, t)}
        for li in sorted(loads):
            ctx.all_reduce_sum(loads[li])
        elapsed = time.perf_counter() - t0
        self.w_domain += step_domain
        self._train_loss_since_update += step_domain
        for n, v in step_aux.items():
            self.w_aux[n] = self.w_aux.get(n, 0.0) + v
        self.w_aux_total += step_aux_total
        self.w_kl += step_kl
        self.w_steps += 1
        self.w_tokens += global_tokens
        self.w_time += elapsed
        self.w_grad += norm
        for li, v in loads.items():
            self.w_load[li] = self.w_load[li] + v if li in self.w_load else v
        lm = float(step_domain[:, 0].sum() / step_domain[:, 1].sum())
        return {"loss": lm, "aux_loss": step_aux_total, "grad_norm": norm, "lr": lr, "tokens": global_tokens, "time": elapsed}

    def _fail_nonfinite(self, what: str) -> None:
        latest = ckpt.latest_checkpoint(self.output_dir)
        keep = (
            f"The last good checkpoint {latest} is kept; rerunning the same command resumes from it."
            if latest is not None
            else "No checkpoint had been written yet."
        )
        raise MoeforgeError(
            f"the {what} became NaN or infinite at step {self.step + 1}; training stopped without taking that step. "
            f"{keep} Lower lr (now {self.config.lr:g}), keep grad_clip on, check the data, or use precision: fp32."
        )

    def _summary(self, resumed_from: int | None) -> str:
        cfg = self.config
        doms = ", ".join(f"{d.name} {len(d.train):,} blocks" for d in self.domains)
        tokens = cfg.batch_size * cfg.seq_len
        where = f"resuming at step {resumed_from}" if resumed_from is not None else "starting"
        return (
            f"{where}: {self.trainable:,} of {self.total_params:,} parameters train; {cfg.steps} steps x "
            f"{cfg.batch_size} x {cfg.seq_len} tokens ({tokens:,}/step) on {self.ctx.world_size} process(es), "
            f"{self.accum} micro-batch(es) of {self.micro} each; {cfg.mixture.type} mixture over {doms}; "
            f"output {self.output_dir}" + self._warmup_note()
        )

    def _warmup_note(self) -> str:
        """A warning when the linear warmup is longer than the run: the learning rate then peaks at
        lr x steps / warmup_steps and never reaches ``lr`` (easy to miss when ``--steps`` is cut for a test)."""
        cfg = self.config
        if cfg.warmup_steps <= cfg.steps:
            return ""
        return (f"\nnote: warmup_steps {cfg.warmup_steps} > steps {cfg.steps}: the learning rate peaks at "
                f"{cfg.lr * cfg.steps / cfg.warmup_steps:.3g} (lr {cfg.lr:g} x {cfg.steps}/{cfg.warmup_steps}) and "
                f"never reaches lr; lower warmup_steps (e.g. --warmup_steps {max(1, cfg.steps // 10)}) to train at lr.")

    # ======================================================================== dynamic mixture
    def _mixture_losses(self) -> dict[str, float]:
        m = self.config.mixture
        if m.signal == "valid":
            return self.evaluate(max_tokens=m.eval_tokens)
        t = self._train_loss_since_update
        return {n: float(t[i, 0] / t[i, 1]) for i, n in enumerate(self.config.domain_names) if t[i, 1] > 0}

    def _init_reference(self) -> None:
        m = self.config.mixture
        if not self.mixture.dynamic or self.mixture.reference is not None:
            return
        if m.reference_losses is not None:
            self.mixture.set_reference(m.reference_losses)
            return
        if m.reference_model is not None:
            if self.teacher is not None and m.reference_model == self.config.distill.teacher:
                ref = self.teacher
            else:
                ref = self._load_frozen(m.reference_model, "mixture reference model")
            losses = self.evaluate(model=ref, max_tokens=m.eval_tokens)
            if ref is not self.teacher:
                del ref
        else:
            losses = self.evaluate(max_tokens=m.eval_tokens)
        missing = [n for n in self.config.domain_names if n not in losses]
        if missing:
            raise MoeforgeError(f"dynamic mixture: no validation data to compute reference losses for {missing}.")
        self.mixture.set_reference(losses)

    # ============================================================================= final
    def _save_final(self) -> Path:
        from ..utils.io import atomic_output_dir, safetensors_errors_as_os_errors

        final = self.output_dir / FINAL_DIR
        model = self.model
        fsdp = self.config.parallel == "fsdp" and self.ctx.distributed
        full = None
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        error = ""
        if self.ctx.is_main:
            # what a save killed midway left (atomic_output_dir's folders beside final/): whole models
            for stale in [*self.output_dir.glob(f".{FINAL_DIR}.tmp-*"), *self.output_dir.glob(f".{FINAL_DIR}.old-*")]:
                shutil.rmtree(stale, ignore_errors=True)
            try:
                # written aside and renamed: a final/ that exists is complete (a rerun relies on it)
                with atomic_output_dir(final, overwrite=True) as tmp, safetensors_errors_as_os_errors(final):
                    if hasattr(model, "save_trained"):  # adapters, compositions: their own files only
                        model.save_trained(tmp)
                        if hasattr(self.tokenizer, "save_pretrained"):
                            self.tokenizer.save_pretrained(str(tmp))
                    else:
                        if full is not None:
                            model.save_pretrained(str(tmp), state_dict=full)
                        else:
                            model.save_pretrained(str(tmp))
                        self.tokenizer.save_pretrained(str(tmp))
            except OSError as err:
                error = str(err)
        if not self.ctx.all_true(not error):
            raise MoeforgeError(
                f"could not write the final model to {final}: {error or 'the main process failed'}. "
                "The last checkpoint is intact; free space and rerun the same command."
            )
        return final

    def _drop_stale_final(self) -> None:
        """Remove a ``final/`` left by an earlier, shorter run before the last checkpoint is written (main process).

        A rerun takes the ``final/`` beside a checkpoint at ``steps`` for that checkpoint's model; an
        extended run stopped between its last checkpoint and its final save must not leave the
        shorter run's model there to be taken for its own.
        """
        shutil.rmtree(self.output_dir / FINAL_DIR, ignore_errors=True)  # the other processes wait in save()

    # ============================================================================== run
    def run(self) -> TrainResult:
        start = time.perf_counter()
        try:
            latest = self._setup()
            result = self._run(latest, start)
        except BaseException:  # a failure or Ctrl-C before the first checkpoint leaves output_dir as it was
            if hasattr(self, "ctx") and self.ctx.is_main:
                self._settle_output_dir(succeeded=False)
            raise
        else:
            if self.ctx.is_main:
                self._settle_output_dir(succeeded=True)
            return result
        finally:
            if hasattr(self, "ctx"):
                self._release_process_group_holders()
                teardown(self.ctx)

    def _release_process_group_holders(self) -> None:
        """Free what holds the process group before the group is destroyed.

        The DDP reducer and FSDP2's parameter groups reference the group, and their module <->
        state cycles wait for the cycle collector: left alone, the group outlived
        ``destroy_process_group`` into interpreter shutdown (suspected in a worker of a successful
        2-process fsdp run that aborted at exit, "terminate called without an active exception",
        and in an earlier run that hung after ``run()`` returned). Under FSDP2, DTensor's
        sharding-propagation caches also hold the device mesh, and with it the group, until they
        are emptied. Once all that is freed, the group's last reference is the one
        ``destroy_process_group`` drops, and the group closes there, while every process is alive.
        """
        self.wrapped = None
        if self.ctx.distributed and self.config.parallel == "fsdp":
            # the sharded model and its optimizer state are DTensors over the group: useless once it is gone
            for name in ("model", "optimizer"):
                if hasattr(self, name):
                    setattr(self, name, None)
            clear_dtensor_caches()
        if self.ctx.distributed:
            gc.collect()

    def _run(self, latest: Path | None, start: float) -> TrainResult:
        cfg, ctx = self.config, self.ctx
        resumed_from = None
        if latest is not None:
            self._resume(latest)
            resumed_from = self.step
        self._claim_output_dir()
        if latest is None and ctx.is_main:
            self.writer.reset()
        # model-side randomness differs per process (dropout, router noise); restored on resume
        if latest is None:
            _seed_all(cfg.seed + 7919 * ctx.rank)
        self._init_reference()

        bar = None
        if cfg.progress and ctx.is_main and self.step < cfg.steps:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True, mininterval=0.5)
            bar.write(self._summary(resumed_from))
        last_plot = time.perf_counter()
        eval_losses: dict[str, float] = {}
        has_valid = any(d.valid is not None for d in self.domains)
        try:
            while self.step < cfg.steps and not self.should_stop:
                stats = self.train_step()
                step = self.step
                if bar is not None:
                    tps = stats["tokens"] / stats["time"] if stats["time"] > 0 else 0.0
                    bar.set_postfix(loss=f"{stats['loss']:.3f}", aux=f"{stats['aux_loss']:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
                    bar.update(1)
                self._callback("on_step_end", step, stats)
                if self.mixture.due(step):
                    losses = self._mixture_losses()
                    self.mixture.update(losses)
                    self._train_loss_since_update = self._zeros_domain()
                    if cfg.mixture.signal == "valid":
                        self._emit_eval(self._eval_record(losses, budget=cfg.mixture.eval_tokens))
                if step % cfg.log_every == 0 or step == cfg.steps or self.should_stop:
                    rec = self._log_record()
                    if ctx.is_main:
                        self.writer.write(rec)
                    self._callback("on_log", rec)
                    self._reset_window()
                periodic = bool(cfg.eval_every) and step % cfg.eval_every == 0 and step != cfg.steps
                if periodic and has_valid:
                    self._emit_eval(self._eval_record(self.evaluate()))
                if periodic and self.tasks:
                    self._emit_eval(self._tasks_record())
                if step % cfg.save_every == 0 or step == cfg.steps or self.should_stop:
                    if step == cfg.steps and ctx.is_main and cfg.save_final:  # it is about to be replaced
                        self._drop_stale_final()
                    self.save()
                    if cfg.plots and ctx.is_main and time.perf_counter() - last_plot > PLOT_INTERVAL_S:
                        write_plots(self.output_dir)
                        last_plot = time.perf_counter()
        finally:
            if bar is not None:
                bar.close()

        if has_valid:
            recorded = [r for r in read_metrics(self.output_dir)
                        if r.get("kind") == "eval" and r["step"] == self.step and r.get("final")]
            if ctx.all_true(resumed_from is not None and resumed_from >= cfg.steps and bool(recorded)):
                # a finished run rerun: its final evaluation is on record, nothing to recompute
                rec = recorded[-1]
                eval_losses = dict(rec["eval"])
            else:
                eval_losses = self.evaluate()
                rec = self._eval_record(eval_losses, final=True)
                if ctx.is_main and not recorded:
                    self.writer.write(rec)
            self._callback("on_eval", rec)
        if self.tasks and self.step >= cfg.steps:
            done = [r for r in read_metrics(self.output_dir)
                    if r.get("kind") == "tasks" and r["step"] == self.step and r.get("final")]
            if not ctx.all_true(bool(done)):  # a finished run rerun keeps its recorded accuracies
                self._emit_eval(self._tasks_record(final=True))
        final_dir = None
        if cfg.save_final and self.step >= cfg.steps:
            final = self.output_dir / FINAL_DIR
            already = resumed_from == cfg.steps and final.is_dir()
            final_dir = final if ctx.all_true(already) else self._save_final()
        ctx.barrier()
        history = read_metrics(self.output_dir) if ctx.is_main else []
        if cfg.plots and ctx.is_main:
            write_plots(self.output_dir, history)
        train_recs = [r for r in history if r.get("kind") == "train"]
        result = TrainResult(
            output_dir=self.output_dir,
            final_dir=final_dir,
            steps=self.step,
            resumed_from=resumed_from,
            final_loss=train_recs[-1]["loss"] if train_recs else None,
            eval_losses=eval_losses,
            weights=self.mixture.as_dict(),
            tokens=self.tokens,
            wall_time_s=time.perf_counter() - start,
            metrics_path=self.writer.path,
            history=history,
            # FSDP2 shards are DTensors over the process group, which is destroyed when run() returns
            model=None if ctx.distributed and cfg.parallel == "fsdp" else self.model,
        )
        self._callback("on_train_end", result)
        return result


# ================================================================================== helpers
#: model types whose logits are exactly ``lm_head(last hidden state)``, so the LM head may be fused
#: with the loss; other families post-process the logits in their forward
PLAIN_HEAD_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "moeforge", "olmo", "olmo2"})


def _refuse_foreign_moe(model: nn.Module) -> None:
    """A transformers MoE model moeforge does not import would train without (or with wrongly
    weighted) router aux losses and no routing records; refuse it with the way in."""
    from ..models import is_transformers_moe

    if is_transformers_moe(model):
        cfg = model.config
        raise MoeforgeError(
            f"{type(model).__name__} is a transformers MoE model; moeforge trains MoE models on its own layer "
            "(router aux losses, routing records) and imports Mixtral and Qwen2-MoE checkpoints onto it with "
            f"moeforge.load. model_type {getattr(cfg, 'model_type', None)!r} is not imported: train it with "
            "transformers, or adapt it with a `peft:` section (its MoE layers stay frozen)."
        )


def _within(path: Path, directory: Path) -> bool:
    """Whether ``path`` is ``directory`` or lies inside it (symlinks resolved)."""
    path, directory = path.resolve(), directory.resolve()
    return path == directory or directory in path.parents


#: config keys a resumed run may change: where and how it runs, logs and saves, and how long
#: (more steps re-plan the cosine schedule over the new total). Any other change (model,
#: data, batch, sequence length, optimiser, objective, wrappers, seed) would splice two runs.
RESUMABLE_CHANGES = frozenset({
    "output_dir", "resume", "overwrite", "progress", "plots", "save_final", "save_every", "keep_last",
    "log_every", "eval_every", "eval_tokens", "eval_tasks", "cache_dir", "device", "precision", "steps", "parallel",
    "micro_batch_size", "find_unused_parameters", "gradient_checkpointing", "fused_cross_entropy", "attention",
})


def config_changes(saved: dict[str, Any], current: dict[str, Any], *, moe: bool = False) -> list[str]:
    """``key: old -> new`` for every value that differs outside :data:`RESUMABLE_CHANGES`
    (nested sections as dotted keys, data sources by name). With ``moe`` (the model has MoE
    layers) ``micro_batch_size`` is not resumable either: the routers' aux losses, Switch capacity
    and expert choice are computed per micro-batch, so it changes the objective."""

    old, new = ckpt.flatten_settings(saved), ckpt.flatten_settings(current)
    # a source added or removed is named once, by the "(sources)" line, not field by field
    one_sided = tuple(f"{key[: -len(' (sources)')]}.{name}."
                      for key in set(old) | set(new) if key.endswith(" (sources)")
                      for name in set(old.get(key) or []) ^ set(new.get(key) or []))
    resumable = RESUMABLE_CHANGES - ({"micro_batch_size"} if moe else set())
    return ckpt.setting_changes(
        old, new, skip=lambda key: key.split(".")[0].split(" ")[0] in resumable or key.startswith(one_sided))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _reset_router_loads(model: nn.Module) -> None:
    """Start the aux-loss-free routers' load counts at zero (nothing is pending before the first step)."""
    from ..moe.routers import SigmoidBiasRouter

    for m in model.modules():
        if isinstance(m, SigmoidBiasRouter):
            m.pending_load.zero_()


def _vocab_size(model: nn.Module) -> int | None:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and hasattr(emb, "weight"):
        return int(emb.weight.shape[0])
    cfg = getattr(model, "config", None)
    return getattr(cfg, "vocab_size", None)


def _accepts_output_routing(model: nn.Module) -> bool:
    """Whether ``model(..., output_routing=True)`` returns per-layer routing (moeforge MoE models)."""
    from ..models.modeling_moeforge import MoeforgeForCausalLM

    params = inspect.signature(model.forward).parameters
    if "output_routing" in params:
        return True
    has_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return has_kwargs and any(isinstance(m, MoeforgeForCausalLM) for m in model.modules()) and not isinstance(model, MoeforgeForCausalLM)
