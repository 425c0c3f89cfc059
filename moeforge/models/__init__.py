"""Model classes moeforge registers with transformers' Auto classes."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_moeforge import MoeforgeConfig
from .modeling_moeforge import MoeforgeCausalLMOutput, MoeforgeForCausalLM, MoeforgeModel


def register_auto_classes() -> None:
    """Make ``AutoModelForCausalLM.from_pretrained`` open ``model_type: moeforge`` checkpoints."""
    try:
        AutoConfig.register("moeforge", MoeforgeConfig)
    except ValueError:  # already registered
        pass
    try:
        AutoModelForCausalLM.register(MoeforgeConfig, MoeforgeForCausalLM)
    except ValueError:
        pass


register_auto_classes()


def is_transformers_moe(model) -> bool:
    """Whether ``model`` is an MoE model transformers runs itself (not on moeforge's MoE layer):
    moeforge neither counts its active parameters nor records its routing, nor weights its aux loss."""
    cfg = getattr(model, "config", None)
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    return (not isinstance(model, MoeforgeForCausalLM) and isinstance(experts, int) and experts > 1
            and bool(getattr(cfg, "num_experts_per_tok", None)))


__all__ = ["MoeforgeConfig", "MoeforgeForCausalLM", "MoeforgeModel", "MoeforgeCausalLMOutput", "is_transformers_moe",
           "register_auto_classes"]
