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

__all__ = ["MoeforgeConfig", "MoeforgeForCausalLM", "MoeforgeModel", "MoeforgeCausalLMOutput", "register_auto_classes"]
