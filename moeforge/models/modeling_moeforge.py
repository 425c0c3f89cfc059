"""``MoeforgeForCausalLM``: LLaMA attention with :class:`~moeforge.moe.MoELayer` feed-forward blocks.

The decoder is LLaMA's (transformers' ``LlamaAttention``, ``LlamaRMSNorm``, rotary embedding);
the loop over layers is written here so that each MoE layer's auxiliary losses and routing
decisions are returned in the model output instead of being stashed in globals or hooks.

Checkpoint keys (``save_pretrained`` layout), for layer i in ``moe_layers``:

==========================================================  ==============
key                                                         shape
==========================================================  ==============
model.layers.{i}.mlp.router.weight                          (E, H)
model.layers.{i}.mlp.router.noise (noisy_topk)              (E, H)
model.layers.{i}.mlp.router.mlp_out (noisy_topk router_mlp)  (E, E)
model.layers.{i}.mlp.router.bias (sigmoid_bias, buffer)     (E,)
model.layers.{i}.mlp.experts.gate_up_proj (glu)             (E, 2I, H)
model.layers.{i}.mlp.experts.up_proj (plain MLP)            (E, I, H)
model.layers.{i}.mlp.experts.down_proj                      (E, H, I)
model.layers.{i}.mlp.shared_experts.{gate,up}_proj.weight   (S*Is, H)
model.layers.{i}.mlp.shared_experts.down_proj.weight        (H, S*Is)
==========================================================  ==============

Other layers keep LLaMA's ``mlp.{gate,up,down}_proj.weight``; attention, norms, embeddings and
``lm_head`` are LLaMA's keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils.output_capturing import capture_outputs

from ..moe.experts import StackedExperts
from ..moe.layer import MoELayer, MoEOutput
from ..moe.routers import NoisyTopKRouter, Router, SigmoidBiasRouter, SwitchRouter, switch_router_init_
from ..moe.routing import Routing
from .configuration_moeforge import MoeforgeConfig


class MoeforgeDecoderLayer(GradientCheckpointingLayer):
    """LLaMA decoder layer whose FFN is an MoE layer (or LLaMA's MLP outside ``moe_layers``).

    Returns ``(hidden_states, moe_output, *aux_losses)``; ``moe_output`` is None for dense layers
    (and no losses follow); the losses are ``moe_output.aux_losses``' values in their order.
    """

    def __init__(self, config: MoeforgeConfig, layer_idx: int) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.layer_idx = layer_idx
        self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = MoELayer(config.layer_moe_config(layer_idx)) if self.is_moe else LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        token_mask: Tensor | None = None,
        **kwargs,
    ) -> tuple[Tensor | MoEOutput | None, ...]:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            # as Mistral/Mixtral do: kernels without a mask tensor (flash-attention) take the window here
            sliding_window=self.self_attn.config.sliding_window or None,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        if not self.is_moe:
            return residual + self.mlp(hidden_states), None
        moe_out = self.mlp(hidden_states, token_mask=token_mask)
        # the aux losses also travel as top-level tensors of the output tuple: reentrant activation
        # checkpointing (use_reentrant=True) tracks gradients through those only, not through the
        # tensors inside the MoEOutput object (the model reads the losses from these positions)
        return (residual + moe_out.hidden_states, moe_out, *moe_out.aux_losses.values())


def padding_mask(attention_mask: Tensor | None, batch_seq: tuple[int, int]) -> Tensor | None:
    """(B, S) bool, False for padding, from a (B, past + S) 0/1 attention mask; None when there is
    no padding among these S tokens (the MoE layers then route every token)."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[0] != batch_seq[0]:
        return None
    mask = attention_mask[:, -batch_seq[1]:].to(torch.bool)
    return None if bool(mask.all()) else mask


class MoeforgePreTrainedModel(PreTrainedModel):
    config: MoeforgeConfig
    config_class = MoeforgeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoeforgeDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _keep_in_fp32_modules = ["router"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": MoeforgeDecoderLayer,
        "attentions": LlamaAttention,
    }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, StackedExperts):
            for p in (module.gate_up_proj, module.up_proj, module.down_proj):
                if p is not None:
                    init.normal_(p, mean=0.0, std=std)
        elif isinstance(module, Router):
            rstd = module.config.router_init_std
            if isinstance(module, SwitchRouter) and rstd is None:
                switch_router_init_(module.weight)
            else:
                init.normal_(module.weight, mean=0.0, std=std if rstd is None else rstd)
            if isinstance(module, NoisyTopKRouter):
                init.zeros_(module.noise)
                if module.mlp_out is not None:
                    init.normal_(module.mlp_out, mean=0.0, std=module.num_experts**-0.5)
            if isinstance(module, SigmoidBiasRouter):
                init.zeros_(module.bias)
                init.zeros_(module.pending_load)  # non-persistent: never in a checkpoint, so never loaded


@dataclass
class MoeforgeModelOutput(BaseModelOutputWithPast):
    """Base model output plus MoE auxiliaries.

    aux_loss: scalar, sum over MoE layers of the weighted router losses.
    aux_losses: name -> scalar, summed over layers.
    routing: per layer, the detached :class:`Routing` (None for dense layers), when requested.
        With padding in ``attention_mask``, token-choice routing covers the real tokens only (in
        order; ``token_index`` counts them), expert choice the full (B, S) grid.
    """

    aux_loss: Tensor | None = None
    aux_losses: dict | None = None
    routing: tuple[Routing | None, ...] | None = None


@dataclass
class MoeforgeCausalLMOutput(CausalLMOutputWithPast):
    """Causal LM output plus MoE auxiliaries.

    loss: next-token loss plus ``aux_loss`` when training with labels.
    lm_loss: the next-token loss alone.
    """

    lm_loss: Tensor | None = None
    aux_loss: Tensor | None = None
    aux_losses: dict | None = None
    routing: tuple[Routing | None, ...] | None = None


class MoeforgeModel(MoeforgePreTrainedModel):
    def __init__(self, config: MoeforgeConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [MoeforgeDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        output_routing: bool = False,
        **kwargs,
    ) -> MoeforgeModelOutput:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen).unsqueeze(0)
        mask_fn = create_sliding_window_causal_mask if self.config.sliding_window else create_causal_mask
        causal_mask = mask_fn(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        token_mask = padding_mask(attention_mask, inputs_embeds.shape[:2])
        aux_total = None
        aux_losses: dict[str, Tensor] = {}
        routing: list[Routing | None] = []
        for layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states, moe_out, *losses = layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                token_mask=token_mask,
                **kwargs,
            )
            if moe_out is not None:
                layer_losses = dict(zip(moe_out.aux_losses, losses))
                layer_aux = torch.stack(list(layer_losses.values())).sum() if layer_losses else moe_out.aux_loss
                aux_total = layer_aux if aux_total is None else aux_total + layer_aux
                for name, value in layer_losses.items():
                    aux_losses[name] = aux_losses[name] + value if name in aux_losses else value
            if output_routing:
                routing.append(None if moe_out is None else moe_out.routing.detach())
        hidden_states = self.norm(hidden_states)
        return MoeforgeModelOutput(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values,
            aux_loss=aux_total,
            aux_losses=aux_losses,
            routing=tuple(routing) if output_routing else None,
        )


class MoeforgeForCausalLM(MoeforgePreTrainedModel, GenerationMixin):
    """Causal LM head over :class:`MoeforgeModel`.

    ``forward(..., labels=..., output_routing=False)`` returns :class:`MoeforgeCausalLMOutput`;
    in training mode the routers' weighted aux losses are added to ``loss`` (``lm_loss`` holds
    the next-token loss alone).
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoeforgeConfig) -> None:
        super().__init__(config)
        self.model = MoeforgeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        output_routing: bool = False,
        **kwargs,
    ) -> MoeforgeCausalLMOutput:
        outputs: MoeforgeModelOutput = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_routing=output_routing,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:, :]
        elif isinstance(logits_to_keep, Tensor):
            hidden_states = hidden_states[:, logits_to_keep, :]
        logits = self.lm_head(hidden_states)
        lm_loss = loss = None
        if labels is not None:
            lm_loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            loss = lm_loss
            if self.training and outputs.aux_loss is not None:
                loss = lm_loss + outputs.aux_loss.to(lm_loss.dtype)
        return MoeforgeCausalLMOutput(
            loss=loss,
            lm_loss=lm_loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            aux_loss=outputs.aux_loss,
            aux_losses=outputs.aux_losses,
            routing=outputs.routing,
        )

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers, in depth order."""
        return [layer.mlp for layer in self.model.layers if layer.is_moe]


__all__ = ["MoeforgeForCausalLM", "MoeforgeModel", "MoeforgePreTrainedModel", "MoeforgeCausalLMOutput"]
