"""``ComposedForCausalLM``: an anchor LM m_B cross-attending to an augmenting LM m_A (CALM, Bansal et al. 2024).

Both models stay frozen and unmodified; the composed model owns the connections
(:class:`~moeforge.compose.layers.Connection`) and, for the duration of one forward call only,
forward hooks on the chosen decoder layers: hooks on m_A's layers capture their outputs, hooks on
m_B's layers add the cross-attention output to theirs. The hooks are removed when the call ends,
so the wrapped models keep working on their own. A hook reads the hidden states whether a layer
returns a bare tensor (transformers v5 LLaMA) or a tuple (moeforge's MoE layers, older versions).

One forward call, for input ids (batch, T) and a cache holding S - T earlier positions:

1. m_A's decoder runs on the ids (no gradient) with its own KV cache; the captured states
   (batch, T, D_A) are projected to keys/values and appended to the connection's key/value cache,
   so m_A is refreshed at every decoding step (not frozen at the prompt).
2. m_B runs on the same ids with its KV cache; after each chosen layer its states (batch, T, D_B)
   attend causally to the (batch, S) augmenting positions (position t sees positions <= t).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..errors import MoeforgeError
from . import checkpoint as ckpt
from .config import CALMConfig
from .layers import Connection, cross_attention_mask


# ------------------------------------------------------------------------------ model plumbing
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (``model.model.layers`` for the LLaMA family)."""
    candidates = []
    if hasattr(model, "get_decoder"):
        candidates.append(model.get_decoder())
    candidates += [getattr(model, "model", None), getattr(model, "transformer", None)]
    for base in candidates:
        for attr in ("layers", "h"):
            layers = getattr(base, attr, None) if base is not None else None
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return layers
    raise MoeforgeError(
        f"cannot find the decoder layers of {type(model).__name__}; CALM composes transformers causal LMs "
        "whose decoder keeps its layers in `.model.layers` (LLaMA, Mistral, Qwen2, moeforge MoE models)."
    )


def decoder_of(model: nn.Module) -> nn.Module:
    """The base decoder (without the LM head) whose forward runs the layers."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    return base


def _text_config(model: nn.Module):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def hidden_of(output) -> Tensor:
    """The hidden states in a decoder layer's output: a bare tensor or the first item of a tuple."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise MoeforgeError(
        f"a decoder layer returned {type(output).__name__}; CALM expects hidden states as a tensor or as the "
        "first item of a tuple."
    )


def with_hidden(output, hidden: Tensor):
    """``output`` with its hidden states replaced by ``hidden``, same container type."""
    if isinstance(output, Tensor):
        return hidden
    return type(output)([hidden, *output[1:]]) if isinstance(output, list) else (hidden, *output[1:])


# ------------------------------------------------------------------------------------ cache
class CompositionCache:
    """Decoding state of a composed model: both models' KV caches plus each connection's keys/values.

    ``keys[k]`` / ``values[k]``: (batch, heads, S, head_dim), the projected augmenting states of
    every position seen so far at connection k.
    """

    def __init__(self, anchor_cache, augmenting_cache, num_connections: int) -> None:
        self.anchor = anchor_cache
        self.augmenting = augmenting_cache
        self.keys: list[Tensor | None] = [None] * num_connections
        self.values: list[Tensor | None] = [None] * num_connections

    def get_seq_length(self) -> int:
        return self.anchor.get_seq_length()

    def append(self, k: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Append new positions for connection k; returns all positions' keys and values."""
        if self.keys[k] is not None:
            keys = torch.cat([self.keys[k], keys], dim=2)
            values = torch.cat([self.values[k], values], dim=2)
        self.keys[k], self.values[k] = keys, values
        return keys, values


@dataclass
class ComposedCausalLMOutput(CausalLMOutputWithPast):
    """``loss`` (with labels), ``logits`` (batch, T, vocab) from the anchor's head, ``past_key_values``
    a :class:`CompositionCache` when caching, ``routing`` the anchor's per-layer routing when it is
    a moeforge MoE model and ``output_routing=True``.

    There is no ``aux_loss``: the anchor is frozen, and its routers' balancing losses would only
    push gradient into the composition through the anchor's hidden states.
    """

    routing: tuple | None = None


# ------------------------------------------------------------------------------------ model
class ComposedForCausalLM(nn.Module):
    """Anchor m_B + augmenting m_A + trainable connections; called like a transformers causal LM.

    ``model(input_ids, attention_mask=None, labels=None)`` -> ``.loss``, ``.logits``;
    ``model.generate(input_ids, max_new_tokens=...)`` decodes with both models' KV caches.
    Only the connections have ``requires_grad=True``; the two models stay in eval mode even
    when the composed model trains (their dropout and routing noise stay off).
    """

    def __init__(
        self,
        anchor: nn.Module,
        augmenting: nn.Module,
        config: CALMConfig,
        *,
        sources: dict[str, str | None] | None = None,
    ) -> None:
        super().__init__()
        self.anchor = anchor
        self.augmenting = augmenting
        self.calm_config = config
        self.sources = dict(sources or {})
        aug_cfg, anc_cfg = _text_config(augmenting), _text_config(anchor)
        self.layer_pairs = config.layer_pairs(len(decoder_layers(augmenting)), len(decoder_layers(anchor)))
        num_heads = config.num_heads or anc_cfg.num_attention_heads
        head_dim = anc_cfg.hidden_size // num_heads
        if head_dim * num_heads != anc_cfg.hidden_size:
            raise MoeforgeError(
                f"compose.num_heads={num_heads} does not divide the anchor width {anc_cfg.hidden_size}; "
                "choose a divisor of the width or leave num_heads unset (the anchor's head count)."
            )
        device = next(anchor.parameters()).device
        self.connections = nn.ModuleList(
            Connection(
                aug_cfg.hidden_size,
                anc_cfg.hidden_size,
                num_heads,
                head_dim=head_dim,
                norm=config.norm,
                eps=getattr(anc_cfg, "rms_norm_eps", 1e-6),
                dropout=config.dropout,
                init_std=config.init_std,
                rope_theta=_rope_theta(anc_cfg) if config.rope else None,
            ).to(device)
            for _ in self.layer_pairs
        )
        for model in (anchor, augmenting):
            model.requires_grad_(False)
            model.eval()

    # ------------------------------------------------------------------ nn.Module behaviour
    def train(self, mode: bool = True) -> ComposedForCausalLM:
        super().train(mode)
        self.anchor.eval()
        self.augmenting.eval()
        return self

    @property
    def config(self):
        """The anchor's config (vocabulary, special tokens): the composed model speaks the anchor's language."""
        return self.anchor.config

    def get_input_embeddings(self) -> nn.Module:
        """The anchor's token embedding (both models read the same ids)."""
        return self.anchor.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.anchor.get_output_embeddings()

    @property
    def device(self) -> torch.device:
        return next(self.connections.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.connections.parameters()).dtype

    def composition_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters (the connections)."""
        return list(self.connections.parameters())

    def num_composition_parameters(self) -> int:
        """n x (D_A D_B + 4 D_B^2) plus norms: the paper's count, with the output projection."""
        return sum(p.numel() for p in self.connections.parameters())

    def composition_state_dict(self) -> dict[str, Tensor]:
        return {f"connections.{k}": v for k, v in self.connections.state_dict().items()}

    def new_cache(self) -> CompositionCache:
        return CompositionCache(
            DynamicCache(config=self.anchor.config),
            DynamicCache(config=self.augmenting.config),
            len(self.connections),
        )

    # ------------------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: CompositionCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        output_routing: bool = False,
        **kwargs,
    ) -> ComposedCausalLMOutput:
        """input_ids (batch, T); attention_mask (batch, S) over cached + new positions (1 = token).

        Returns the anchor's loss/logits with the composition applied; ``past_key_values`` is a
        :class:`CompositionCache` when ``use_cache`` (or a cache was passed).
        """
        if past_key_values is not None and not isinstance(past_key_values, CompositionCache):
            raise MoeforgeError(
                f"past_key_values of a composed model must be a CompositionCache (model.new_cache()), "
                f"got {type(past_key_values).__name__}."
            )
        cache = past_key_values
        if cache is None and use_cache:
            cache = self.new_cache()
        past = cache.get_seq_length() if cache is not None else 0
        length = past + input_ids.shape[1]
        if attention_mask is not None and attention_mask.shape[-1] != length:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions but cache + input hold {length}"
            )
        mask = cross_attention_mask(input_ids.shape[1], length, attention_mask)
        mask = mask.to(input_ids.device)
        positions = position_ids
        if positions is None:
            positions = torch.arange(past, length, device=input_ids.device)[None]
        common = dict(attention_mask=attention_mask, position_ids=position_ids, use_cache=cache is not None)

        # 1. augmenting model: capture the chosen layers' outputs (frozen, no gradient needed)
        captured: list[Tensor | None] = [None] * len(self.connections)
        aug_layers = decoder_layers(self.augmenting)
        hooks = [
            aug_layers[a].register_forward_hook(partial(_capture_hook, captured, k))
            for k, (a, _) in enumerate(self.layer_pairs)
        ]
        try:
            with torch.no_grad():
                decoder_of(self.augmenting)(
                    input_ids=input_ids,
                    past_key_values=cache.augmenting if cache is not None else None,
                    **common,
                )
        finally:
            for h in hooks:
                h.remove()
        keys_values = []
        for k, conn in enumerate(self.connections):
            if captured[k] is None:
                raise MoeforgeError(f"augmenting layer {self.layer_pairs[k][0]} did not run; cannot compose.")
            kv = conn.key_values(captured[k], positions)
            keys_values.append(cache.append(k, *kv) if cache is not None else kv)
        captured.clear()

        # 2. anchor: add each connection's cross-attention output after its layer
        anc_layers = decoder_layers(self.anchor)
        hooks = [
            anc_layers[b].register_forward_hook(partial(_inject_hook, conn, *keys_values[k], mask, positions))
            for k, ((_, b), conn) in enumerate(zip(self.layer_pairs, self.connections))
        ]
        if output_routing and _accepts(self.anchor, "output_routing"):
            kwargs["output_routing"] = True
        try:
            out = self.anchor(
                input_ids=input_ids,
                past_key_values=cache.anchor if cache is not None else None,
                labels=labels,
                logits_to_keep=logits_to_keep,
                **common,
                **kwargs,
            )
        finally:
            for h in hooks:
                h.remove()
        return ComposedCausalLMOutput(
            loss=out.loss, logits=out.logits, past_key_values=cache, routing=getattr(out, "routing", None)
        )

    # ---------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Tensor | None = None,
        *,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.LongTensor:
        """Greedy or sampled decoding; returns (batch, prompt + new) ids like transformers' ``generate``.

        Batches must be left-padded (``attention_mask`` 0 on the left). With ``use_cache`` both
        models and the connections keep KV caches and every step feeds the new token to both
        models; without it every step reruns both models on the whole sequence (same tokens,
        slower: the reference the cached path is tested against). Rows stop at ``eos_token_id``
        (default: the anchor's generation config) and are padded with ``pad_token_id``.
        """
        from .generation import decode_loop

        return decode_loop(
            self, input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id, use_cache=use_cache, generator=generator,
        )

    # ------------------------------------------------------------------------------ save / load
    def save_trained(self, directory: str | Path) -> Path:
        """Write the composition weights alone (plus what they belong to) into ``directory``."""
        meta = {
            "calm": self.calm_config.to_dict(),
            "layer_pairs": [list(p) for p in self.layer_pairs],
            "num_parameters": self.num_composition_parameters(),
            "anchor": ckpt.describe_model(self.anchor, self.sources.get("anchor")),
            "augmenting": ckpt.describe_model(self.augmenting, self.sources.get("augmenting")),
        }
        return ckpt.save_composition(directory, self.composition_state_dict(), meta)

    def load_trained(self, directory: str | Path, *, allow_other_models: bool = False) -> ComposedForCausalLM:
        """Load composition weights saved by :meth:`save_trained`; refuse ones saved for other models."""
        directory = Path(directory).expanduser()
        meta = ckpt.read_meta(directory)
        current = {
            "anchor": ckpt.describe_model(self.anchor, self.sources.get("anchor")),
            "augmenting": ckpt.describe_model(self.augmenting, self.sources.get("augmenting")),
        }
        ckpt.check_models_match(meta, current, directory, allow_other_models=allow_other_models)
        if [list(p) for p in self.layer_pairs] != meta.get("layer_pairs"):
            raise MoeforgeError(
                f"the composition in {directory} connects layers {meta.get('layer_pairs')} (augmenting, anchor) "
                f"but this composed model connects {[list(p) for p in self.layer_pairs]}; compose with "
                f"the saved settings ({meta.get('calm')})."
            )
        # settings that change what the weights compute but not their shapes (norm changes the keys too)
        saved = meta.get("calm") or {}
        ours = {"rope": self.calm_config.rope, "norm": self.calm_config.norm,
                "num_heads": self.connections[0].attn.num_heads}
        theirs = dict(saved)
        if "num_heads" in saved:
            theirs["num_heads"] = saved["num_heads"] or _text_config(self.anchor).num_attention_heads
        differ = [f"{key}={theirs[key]!r} (this composed model: {value!r})"
                  for key, value in ours.items() if key in theirs and theirs[key] != value]
        if differ:
            raise MoeforgeError(
                f"the composition in {directory} was trained with {', '.join(differ)}; the weights would compute "
                f"something else here. Compose with the saved settings ({saved}), e.g. load_composition(DIR)."
            )
        state = ckpt.load_weights(directory)
        expected = self.composition_state_dict()
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
        if missing or extra or wrong:
            raise MoeforgeError(
                f"the weights in {directory / ckpt.WEIGHTS_FILE} do not fit this composition: missing {missing[:4]}, "
                f"unexpected {extra[:4]}, wrong shape {wrong[:4]}; re-save them with save_trained."
            )
        self.connections.load_state_dict({k.removeprefix("connections."): v for k, v in state.items()})
        return self


def _accepts(model: nn.Module, name: str) -> bool:
    import inspect

    return name in inspect.signature(model.forward).parameters


def _capture_hook(store: list, k: int, module: nn.Module, args, output) -> None:
    store[k] = hidden_of(output)


def _inject_hook(conn: Connection, keys: Tensor, values: Tensor, mask: Tensor, positions: Tensor,
                 module: nn.Module, args, output):
    return with_hidden(output, conn(hidden_of(output), keys, values, mask, positions))


def _rope_theta(cfg) -> float:
    """The anchor's rotary base (``rope_parameters`` in transformers v5, ``rope_theta`` before)."""
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


__all__ = [
    "ComposedCausalLMOutput", "ComposedForCausalLM", "CompositionCache", "decoder_layers", "hidden_of", "with_hidden",
]
