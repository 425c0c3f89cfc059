"""The adapter layer base: a frozen ``nn.Linear`` plus trainable adapter (and router) parameters.

An adapter layer replaces the Linear in its parent module and keeps the original as
``base_layer``, so removing the adapter puts the very same Linear object back. It forwards
``weight``, ``bias``, ``in_features`` and ``out_features`` to the base layer, since model code
sometimes reads them (T5's FFN checks ``wo.weight.dtype``).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import MoeforgeError
from .context import AdapterContext


class AdapterLayer(nn.Module):
    """Base of :class:`~moeforge.peft.mov.MoVLayer` and :class:`~moeforge.peft.molora.MoLoRALayer`."""

    #: method-specific parameter names saved in adapter files (besides ``router.weight``)
    adapter_parameter_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Linear, name: str, context: AdapterContext) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise MoeforgeError(f"{name} is a {type(base_layer).__name__}; adapters wrap nn.Linear modules only.")
        self.base_layer = base_layer
        self.module_name = name
        self.context = context
        self.disabled = False
        #: input of the enclosing block for the current call, set by the adapted model's hooks
        #: (MoV with ``router_input="block"`` on an input-rescaled FFN target).
        self.block_input: Tensor | None = None

    # -- the base Linear's attributes, for code that reads them off the module
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def adapter_state(self) -> dict[str, Tensor]:
        """The trainable tensors of this layer (adapter and router), keyed relative to the layer."""
        return {k: v for k, v in self.named_parameters() if not k.startswith("base_layer.")}

    def merged_linear(self) -> nn.Linear:
        """A plain Linear computing the same function (single adapters only; mixtures depend on the input)."""
        raise MoeforgeError(
            f"{type(self).__name__} at {self.module_name} mixes experts per token, so it cannot be merged into "
            "one weight; merging works for the single-adapter baselines (IA3Config, LoRAConfig)."
        )
