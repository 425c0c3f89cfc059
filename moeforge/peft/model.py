"""``wrap(model, config)``: inject adapters into a transformers model and freeze everything else.

The returned :class:`AdaptedModel` is a thin ``nn.Module`` around the (modified in place) base
model: calling it calls the base model, so ``model(input_ids, labels=...)`` still returns
``.loss``/``.logits`` and ``generate`` still works; unknown attributes are looked up on the base
model. All base parameters are frozen (``requires_grad=False``); only adapter vectors/matrices and
routers train. Adapters can be switched off (:meth:`AdaptedModel.disable_adapters`), removed
(:meth:`AdaptedModel.remove`, which returns the untouched base model) or, for the single-adapter
baselines, merged (:meth:`AdaptedModel.merge_and_unload`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import MoeforgeError, require
from .base import AdapterLayer
from .config import AdapterConfig, MoLoRAConfig, MoVConfig, config_from_dict
from .context import AdapterContext, RoutingRecorder, _Running, masked_mean, prefix_mean
from .molora import MoLoRALayer
from .mov import MoVLayer
from .targets import default_targets, head_dim_of, match_targets, model_family


@dataclass(frozen=True)
class ParameterSummary:
    """Trainable adapter/router parameters against the frozen base model's parameter count."""

    trainable: int
    base: int

    @property
    def percent(self) -> float:
        """Trainable parameters as a percentage of the base model's parameters."""
        return 100.0 * self.trainable / max(self.base, 1)

    def __str__(self) -> str:
        return f"trainable parameters: {self.trainable:,} ({self.percent:.3f}% of the base model's {self.base:,})"


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    if "." in name:
        parent_name, child = name.rsplit(".", 1)
        return model.get_submodule(parent_name), child
    return model, name


def _first_input(args: tuple, kwargs: dict) -> Any:
    if args:
        return args[0]
    for key in ("hidden_states", "x", "input", "inputs"):
        if key in kwargs:
            return kwargs[key]
    return None


class AdaptedModel(nn.Module):
    """A frozen base model carrying adapter layers; see :func:`wrap`.

    Attributes:
        base_model: the transformers model, with its target Linears replaced by adapter layers.
        peft_config: the :class:`~moeforge.peft.config.AdapterConfig` used.
        context: the :class:`~moeforge.peft.context.AdapterContext` its layers share.
    """

    def __init__(self, base_model: nn.Module, config: AdapterConfig, layers: dict[str, AdapterLayer],
                 context: AdapterContext, requires_grad: dict[str, bool]) -> None:
        super().__init__()
        self.base_model = base_model
        self.peft_config = config
        self.context = context
        self._layer_names = list(layers)
        self._requires_grad = requires_grad
        self._hooks: list[Any] = []
        self._removed = False

    # ---------------------------------------------------------------------------- transformers API
    def forward(self, *args, **kwargs):
        self._check_alive()
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        self._check_alive()
        return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "_modules", "_parameters", "_buffers"):
                raise
            return getattr(self._modules["base_model"], name)

    # ------------------------------------------------------------------------------- inspection
    def adapter_layers(self) -> dict[str, AdapterLayer]:
        """Module name (in the base model) -> adapter layer."""
        self._check_alive()
        return {name: self.base_model.get_submodule(name) for name in self._layer_names}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter and router tensors keyed by their name in the base model (what adapter files hold)."""
        return {f"{name}.{k}": v for name, layer in self.adapter_layers().items() for k, v in layer.adapter_state().items()}

    def parameter_summary(self) -> ParameterSummary:
        """Trainable parameter count and percentage of the base model (the paper's "% params")."""
        adapter_ids = {id(p) for layer in self.adapter_layers().values() for p in layer.adapter_state().values()}
        base = sum(p.numel() for p in self.base_model.parameters() if id(p) not in adapter_ids)
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return ParameterSummary(trainable=trainable, base=base)

    def train(self, mode: bool = True) -> AdaptedModel:
        """Train mode for the adapters. MoE layers of the frozen base (moeforge's) keep their
        inference behaviour, since nothing in them trains: no router noise or jitter, no capacity
        dropping, no aux losses (which would only push gradient into the adapters) and no
        aux-loss-free bias updates (which would change the base the adapter is saved for)."""
        super().train(mode)
        if mode and not self._removed:
            from ..moe.layer import MoELayer

            for module in self.base_model.modules():
                own = [*module.router.parameters(), *module.experts.parameters()] if isinstance(module, MoELayer) else []
                if own and not any(p.requires_grad for p in own):
                    module.eval()
                    for sub in module.modules():  # adapter layers inside it (e.g. on shared experts) still train
                        if isinstance(sub, AdapterLayer):
                            sub.train(True)
        return self

    # ------------------------------------------------------------------------------ on and off
    def disable_adapters(self) -> None:
        """Run the base model alone (adapters stay attached and keep their weights)."""
        for layer in self.adapter_layers().values():
            layer.disabled = True

    def enable_adapters(self) -> None:
        for layer in self.adapter_layers().values():
            layer.disabled = False

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """``with model.adapters_disabled(): ...`` runs the base model, then re-enables the adapters."""
        states = {name: layer.disabled for name, layer in self.adapter_layers().items()}
        self.disable_adapters()
        try:
            yield
        finally:
            for name, layer in self.adapter_layers().items():
                layer.disabled = states[name]

    def remove(self) -> nn.Module:
        """Take the adapters out and return the base model exactly as it was (same Linear objects,
        original ``requires_grad`` flags). This AdaptedModel is unusable afterwards."""
        return self._unwrap(merge=False)

    unload = remove

    def merge_and_unload(self) -> nn.Module:
        """Fold single adapters ((IA)^3, LoRA) into the base weights and return the base model.

        Mixtures (MoV, MoLoRA) mix experts per token and cannot be merged: this raises for them.
        """
        if self.peft_config.has_router:
            raise MoeforgeError(
                f"{type(self.peft_config).__name__} routes each token to its own mix of experts, so it cannot be "
                "merged into the base weights; keep the adapted model, or use remove() to get the base model back."
            )
        return self._unwrap(merge=True)

    def _unwrap(self, *, merge: bool) -> nn.Module:
        self._check_alive()
        for name, layer in self.adapter_layers().items():
            parent, child = _parent(self.base_model, name)
            setattr(parent, child, layer.merged_linear() if merge else layer.base_layer)
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for name, p in self.base_model.named_parameters():
            if name in self._requires_grad:
                p.requires_grad_(self._requires_grad[name])
        self._removed = True
        return self._modules.pop("base_model")

    def _check_alive(self) -> None:
        if self._removed:
            raise MoeforgeError("the adapters were removed from this model; use the base model remove() returned.")

    # --------------------------------------------------------------------------------- routing
    @contextlib.contextmanager
    def record_routing(self) -> Iterator[RoutingRecorder]:
        """Record every router decision made inside the ``with`` block.

        >>> with model.record_routing() as rec:
        ...     model(input_ids, attention_mask=mask)
        >>> rec.mean_probs()  # {"model.layers.0.mlp.down_proj": tensor([...E...]), ...}
        """
        recorder = RoutingRecorder()
        previous = self.context.recorder
        self.context.recorder = recorder
        try:
            yield recorder
        finally:
            self.context.recorder = previous

    # ---------------------------------------------------------------------------------- saving
    def save_adapter(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write ``adapter_model.safetensors`` (adapter + router weights only) and ``adapter_config.json``."""
        from .saving import save_adapter

        return save_adapter(self, directory, overwrite=overwrite)

    def save_trained(self, directory: str | os.PathLike) -> Path:
        """The trainer's final-output hook: :meth:`save_adapter`, replacing an adapter already there."""
        return self.save_adapter(directory, overwrite=True)

    def save_pretrained(self, directory: str | os.PathLike, **_: Any) -> Path:
        """Same as :meth:`save_adapter` (the base model is not copied; load with ``load_adapter``)."""
        return self.save_adapter(directory, overwrite=True)


# ------------------------------------------------------------------------------------- building
def _resolve_targets(model: nn.Module, config: AdapterConfig) -> tuple[list[str], set[str]]:
    """(selected Linear names, the subset rescaled at the input) for ``config``."""
    method = config.method
    if config.target_modules is None:
        targets, ff_default = default_targets(model, method)
        names = match_targets(model, targets)
    else:
        names = match_targets(model, config.target_modules)
        ff_default = default_targets(model, method)[1] if model_family(model) else []
    feedforward: set[str] = set()
    if isinstance(config, MoVConfig):
        if config.feedforward_modules is None:
            if model_family(model) is None:  # no defaults to tell an FFN activation from an output (PEFT refuses too)
                model_type = getattr(getattr(model, "config", None), "model_type", None)
                raise MoeforgeError(
                    f"moeforge has no default feedforward_modules for model_type {model_type!r}: say which targets "
                    "rescale their input (the FFN intermediate activation, e.g. feedforward_modules=['down_proj']) "
                    "rather than their output (keys, values); [] for none."
                )
            feedforward = {n for n in names if any(n == t or n.endswith("." + t) for t in ff_default)}
        else:
            ff_names = match_targets(model, config.feedforward_modules)
            stray = [n for n in ff_names if n not in names]
            require(
                not stray,
                f"feedforward_modules selects {', '.join(stray[:3])}, which target_modules does not; "
                "feedforward_modules must be a subset of target_modules.",
            )
            feedforward = set(ff_names)
    return names, feedforward


def _embedding_width(model: nn.Module) -> int:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None or not hasattr(emb, "embedding_dim"):
        raise MoeforgeError("sentence routing needs the model's input embedding layer (get_input_embeddings()).")
    return emb.embedding_dim


def _is_attention(model: nn.Module, name: str) -> bool:
    parent, _ = _parent(model, name)
    return "attention" in type(parent).__name__.lower()


def _build_layer(model: nn.Module, name: str, config: AdapterConfig, context: AdapterContext,
                 feedforward: set[str], head_dim: int | None) -> AdapterLayer:
    linear = model.get_submodule(name)
    router_input = config.router_input if config.has_router else None
    if isinstance(config, MoVConfig):
        position = "input" if name in feedforward else "output"
        heads = 1
        if position == "output" and router_input == "activation" and head_dim and _is_attention(model, name):
            if linear.out_features % head_dim == 0 and linear.out_features > head_dim:
                heads = linear.out_features // head_dim
            elif isinstance(config, MoVConfig) and config.head_dim:  # the user's head size must fit
                raise MoeforgeError(
                    f"peft head_dim={config.head_dim} does not divide {name}'s width {linear.out_features}; give "
                    "the attention head size (or leave head_dim out to read it from the model's config)."
                )
        features = None
        if router_input == "activation":
            width = linear.in_features if position == "input" else linear.out_features
            features = width // heads
        elif router_input == "block":
            features = linear.out_features if position == "input" else linear.in_features
        elif router_input == "sentence":
            features = _embedding_width(model)
        return MoVLayer(linear, name, context, position=position, num_experts=config.num_experts,
                        router_input=router_input, heads=heads, router_features=features, top_k=config.top_k,
                        init_std=config.router_init_std)
    assert isinstance(config, MoLoRAConfig)
    features = None
    if router_input == "input":
        features = linear.in_features
    elif router_input == "sentence":
        features = _embedding_width(model)
    return MoLoRALayer(linear, name, context, num_experts=config.num_experts, rank=config.rank, alpha=config.alpha,
                       router_input=router_input, router_features=features, top_k=config.top_k,
                       dropout=config.dropout, init_std=config.init_std, router_init_std=config.router_init_std)


def wrap(model: nn.Module | str | os.PathLike, config: AdapterConfig | dict) -> AdaptedModel:
    """Inject the adapters ``config`` describes into ``model`` (in place) and return the adapted model.

    ``model`` is a module, or a path / alias that :func:`moeforge.load` opens first.
    ``config`` is a :class:`MoVConfig`, :class:`MoLoRAConfig`, :class:`IA3Config` or
    :class:`LoRAConfig` (or a dict ``{"method": ..., **fields}``). Every base parameter is frozen;
    adapters start as the identity, so the adapted model's outputs equal the base model's.
    """
    if isinstance(model, (str, os.PathLike)):
        from ..loading import load

        model = load(model)
    if not isinstance(model, nn.Module):
        raise MoeforgeError(f"wrap() adapts a model (an nn.Module, or a path/alias to load), got {type(model).__name__}.")
    if isinstance(config, dict):
        config = config_from_dict(config)
    if not isinstance(config, AdapterConfig):
        raise MoeforgeError(
            f"wrap() needs a MoVConfig, MoLoRAConfig, IA3Config or LoRAConfig, got {type(config).__name__}."
        )
    if isinstance(model, AdaptedModel) or any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise MoeforgeError("this model already carries an adapter; call .remove() first or wrap a fresh base model.")
    names, feedforward = _resolve_targets(model, config)
    require(names, f"{type(config).__name__} selects no module of this {type(model).__name__}; set target_modules.")
    head_dim = config.head_dim if isinstance(config, MoVConfig) and config.head_dim else head_dim_of(model)
    context = AdapterContext()
    layers: dict[str, AdapterLayer] = {}
    for name in names:  # may refuse (e.g. a head_dim that does not fit): nothing of the model is touched yet
        layers[name] = _build_layer(model, name, config, context, feedforward, head_dim)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in layers.items():
        parent, child = _parent(model, name)
        setattr(parent, child, layer)
    adapted = AdaptedModel(model, config, layers, context, requires_grad)
    _install_hooks(adapted, layers)
    return adapted


def wrap_from_config(model: nn.Module, section: dict[str, Any]) -> AdaptedModel:
    """The trainer's entry point: ``section`` is the ``peft:`` mapping of a training config,
    e.g. ``{"method": "mov", "num_experts": 10}``. Unknown keys raise with the closest valid key."""
    return wrap(model, config_from_dict(section, where="the peft section"))


# --------------------------------------------------------------------------------------- hooks
def _install_hooks(adapted: AdaptedModel, layers: dict[str, AdapterLayer]) -> None:
    """Forward hooks that feed the layers what they cannot see from their own input: the enclosing
    block's input (MoV ``router_input="block"`` on FFN targets), the sentence embedding, and the
    attention mask (so routing records skip padding)."""
    model, ctx, config = adapted.base_model, adapted.context, adapted.peft_config
    hooks = adapted._hooks

    # block inputs for input-rescaled MoV targets, captured at their parent module
    by_parent: dict[str, list[AdapterLayer]] = {}
    for name, layer in layers.items():
        if isinstance(layer, MoVLayer) and layer.router_input == "block" and layer.position == "input":
            by_parent.setdefault(name.rsplit(".", 1)[0] if "." in name else "", []).append(layer)
    for parent_name, group in by_parent.items():
        parent = model.get_submodule(parent_name) if parent_name else model

        def pre(module, args, kwargs, group=group):
            x = _first_input(args, kwargs)
            for layer in group:
                layer.block_input = x

        def post(module, args, kwargs, output, group=group):
            for layer in group:
                layer.block_input = None

        hooks.append(parent.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(parent.register_forward_hook(post, with_kwargs=True))

    sentence = config.has_router and getattr(config, "router_input", None) == "sentence"
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    embed = model.get_input_embeddings() if sentence else None

    def embeddings(args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        with torch.no_grad():
            if embeds is not None:
                return embeds.detach().float()
            if ids is None:
                return None
            return embed(ids).float()

    def mask_of(kwargs, key, length):
        mask = kwargs.get(key)
        if mask is None or mask.dim() != 2:
            return None
        return mask[:, -length:]

    if encoder_decoder:
        encoder = model.get_encoder()

        def top_pre(module, args, kwargs):
            ctx.token_mask = None
            ctx.decoder_mask = kwargs.get("decoder_attention_mask")

        def enc_pre(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            length = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
            mask = mask_of(kwargs, "attention_mask", length)
            ctx.token_mask = mask
            if sentence:
                emb = embeddings(args, kwargs)
                ctx.sentence = masked_mean(emb, mask)

        def enc_post(module, args, kwargs, output):
            ctx.token_mask = ctx.decoder_mask

        hooks.append(model.register_forward_pre_hook(top_pre, with_kwargs=True))
        hooks.append(encoder.register_forward_pre_hook(enc_pre, with_kwargs=True))
        hooks.append(encoder.register_forward_hook(enc_post, with_kwargs=True))
        return

    def dec_pre(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        length = ids.shape[1] if ids is not None else (embeds.shape[1] if embeds is not None else None)
        if length is None:
            return
        mask = mask_of(kwargs, "attention_mask", length)
        ctx.token_mask = mask
        if not sentence:
            return
        emb = embeddings(args, kwargs)
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        start_total = start_count = None
        if past:
            run = ctx.running
            if run is None or run.length != past or run.total.shape[0] != emb.shape[0]:
                raise MoeforgeError(
                    "sentence routing lost track of the cached prefix: continue a cached generation with the same "
                    "adapted model that produced the cache, one sequence batch at a time (decoding strategies that "
                    "crop or regroup the cache are not supported with router_input='sentence')."
                )
            start_total, start_count = run.total, run.count
        means, total, count = prefix_mean(emb, mask, start_total, start_count)
        ctx.sentence = means
        ctx.running = _Running(total=total, count=count, length=past + length)
        if cache is not None:
            _follow_cache_reorders(cache, ctx)

    hooks.append(model.register_forward_pre_hook(dec_pre, with_kwargs=True))


def _follow_cache_reorders(cache: Any, ctx: AdapterContext) -> None:
    """Beam search reorders the KV cache's rows between steps (``cache.reorder_cache(beam_idx)``); the
    running prefix sums of sentence routing belong to the same rows, so they must follow, or each beam
    would continue with another beam's prefix embedding."""
    if getattr(cache, "_moeforge_follows_reorders", False) or not hasattr(cache, "reorder_cache"):
        return
    original = cache.reorder_cache

    def reorder_cache(beam_idx, *args, **kwargs):
        result = original(beam_idx, *args, **kwargs)
        run = ctx.running
        if run is not None and run.total.shape[0] == beam_idx.shape[0]:
            idx = beam_idx.to(run.total.device)
            ctx.running = _Running(total=run.total.index_select(0, idx), count=run.count.index_select(0, idx),
                                   length=run.length)
        return result

    cache.reorder_cache = reorder_cache
    cache._moeforge_follows_reorders = True
