"""Parameter-efficient Mixture of Experts on a frozen pretrained model (Zadouri et al. 2023).

>>> from moeforge.peft import MoVConfig, wrap, load_adapter
>>> adapted = wrap(model, MoVConfig(num_experts=4))   # base frozen; vectors + routers train
>>> adapted(input_ids, labels=input_ids).loss.backward()
>>> adapted.save_adapter("out/mov")                   # adapter + router weights only
>>> again = load_adapter(fresh_base_model, "out/mov")

Methods: MoV (mixture of (IA)^3 vectors), MoLoRA (mixture of LoRA experts), and their
single-adapter baselines (IA)^3 and LoRA on the same code paths.
"""

from .analysis import expert_usage, plot_expert_usage, specialisation
from .config import PEFT_CONFIGS, AdapterConfig, IA3Config, LoRAConfig, MoLoRAConfig, MoVConfig, config_from_dict
from .context import RoutingRecorder
from .model import AdaptedModel, ParameterSummary, wrap, wrap_from_config
from .molora import MoLoRALayer
from .mov import MoVLayer
from .router import AdapterRouter
from .saving import load_adapter, read_adapter_config

__all__ = [
    "AdaptedModel",
    "AdapterConfig",
    "AdapterRouter",
    "IA3Config",
    "LoRAConfig",
    "MoLoRAConfig",
    "MoLoRALayer",
    "MoVConfig",
    "MoVLayer",
    "PEFT_CONFIGS",
    "ParameterSummary",
    "RoutingRecorder",
    "config_from_dict",
    "expert_usage",
    "load_adapter",
    "plot_expert_usage",
    "read_adapter_config",
    "specialisation",
    "wrap",
    "wrap_from_config",
]
