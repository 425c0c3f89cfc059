"""``MoeforgeConfig``: a LLaMA-family decoder whose chosen layers use :class:`~moeforge.moe.MoELayer`.

The attention stack is LLaMA's (which also represents SmolLM, Mistral without a sliding window
shorter than the sequence, and Qwen2 through ``attention_bias`` with a zero ``o_proj`` bias);
the feed-forward block of every layer in ``moe_layers`` is an MoE layer built from ``moe``.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

from ..errors import MoeforgeError
from ..moe.config import MoEConfig


@strict
class MoeforgeConfig(LlamaConfig):
    """LLaMA config plus the MoE description.

    Extra fields:
        moe: MoEConfig fields except ``hidden_size`` (taken from the model), as a dict.
        moe_layers: indices of layers whose FFN is an MoE layer; None means every layer.
        moe_overrides: {layer index (str): {MoEConfig field: value}} for per-layer differences
            (e.g. layer-wise rescaling factors in ``output_scale``).
        sliding_window: Mistral/Mixtral local attention window, or None for full attention.
    """

    model_type = "moeforge"

    moe: dict | None = None
    moe_layers: list[int] | None = None
    moe_overrides: dict | None = None
    sliding_window: int | None = None

    def __post_init__(self, **kwargs):
        if self.moe is None:
            self.moe = {"num_experts": 1, "top_k": 1, "expert_size": self.intermediate_size}
        super().__post_init__(**kwargs)
        self._check_shape_fields()
        self._check_moe_fields()
        if self.moe_layers is not None:
            bad = [i for i in self.moe_layers if not isinstance(i, int) or not 0 <= i < self.num_hidden_layers]
            if bad:
                raise MoeforgeError(
                    f"moe_layers {bad} name no layer of this {self.num_hidden_layers}-layer model; use indices "
                    f"0-{self.num_hidden_layers - 1}."
                )
        self._check_override_keys()

    def _check_shape_fields(self) -> None:
        """Refuse impossible attention/stack sizes (e.g. from a hand-edited or foreign config.json),
        which would otherwise fail inside the model with a ZeroDivisionError that names no field."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            value = getattr(self, name, None)
            if name == "head_dim" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MoeforgeError(f"{name} must be a positive integer, got {value!r}; fix the checkpoint's config.json.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise MoeforgeError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads}); fix the checkpoint's config.json."
            )

    def _check_moe_fields(self) -> None:
        """Refuse moeforge's own fields with the wrong type (e.g. from a hand-edited config.json), which
        would otherwise fail later inside the model with an error that names no field."""
        if not isinstance(self.moe, dict):
            raise MoeforgeError(f"moe must be a mapping of MoE settings, got {self.moe!r} ({type(self.moe).__name__}).")
        if self.moe_layers is not None and not isinstance(self.moe_layers, list):
            raise MoeforgeError(
                f"moe_layers must be a list of layer indices or null (every layer), got {self.moe_layers!r} "
                f"({type(self.moe_layers).__name__})."
            )
        if self.moe_overrides is not None:
            if not isinstance(self.moe_overrides, dict):
                raise MoeforgeError(
                    f"moe_overrides must be a mapping of layer index to MoE settings, got {self.moe_overrides!r} "
                    f"({type(self.moe_overrides).__name__})."
                )
            for key, value in self.moe_overrides.items():
                if not isinstance(value, dict):
                    raise MoeforgeError(f"moe_overrides[{key!r}] must be a mapping of MoE settings, got {value!r}.")
        window = self.sliding_window
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 0):
            raise MoeforgeError(f"sliding_window must be a non-negative integer or null (full attention), got {window!r}.")

    def _check_override_keys(self) -> None:
        """Refuse ``moe_overrides`` keys that name no MoE layer (an int key, a layer out of range, a
        dense layer): :meth:`layer_moe_config` looks layers up by their index as a string, so such an
        override was silently never applied."""
        layers = [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]
        for key in self.moe_overrides or {}:
            if not (isinstance(key, str) and key.isdigit() and int(key) in layers):
                hint = f" (write {str(key)!r})" if isinstance(key, int) and key in layers else ""
                raise MoeforgeError(
                    f"moe_overrides key {key!r} names no MoE layer of this model{hint}; keys are the indices of "
                    f"MoE layers as strings, here {', '.join(repr(str(i)) for i in layers) or 'none'}."
                )

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.moe_layers is None or layer_idx in self.moe_layers

    def layer_moe_config(self, layer_idx: int) -> MoEConfig:
        """The validated :class:`MoEConfig` of layer ``layer_idx``."""
        fields: dict[str, Any] = dict(self.moe)
        fields.update((self.moe_overrides or {}).get(str(layer_idx), {}))
        fields["hidden_size"] = self.hidden_size
        try:
            return MoEConfig.from_dict(fields)
        except MoeforgeError as err:
            raise MoeforgeError(f"layer {layer_idx}: {err}") from None


__all__ = ["MoeforgeConfig"]
