"""Config validation, the trainer's ``peft:`` section, and family default targets."""

import pytest

from moeforge.errors import MoeforgeError
from moeforge.peft import IA3Config, LoRAConfig, MoLoRAConfig, MoVConfig, config_from_dict, wrap, wrap_from_config
from moeforge.peft.targets import default_targets

from .conftest import make_model


@pytest.mark.parametrize(
    "build, words",
    [
        (lambda: MoVConfig(num_experts=0), ["num_experts", "positive", "0"]),
        (lambda: MoLoRAConfig(num_experts=-2), ["num_experts", "-2"]),
        (lambda: MoLoRAConfig(rank=0), ["rank", "positive", "0"]),
        (lambda: LoRAConfig(rank=-4), ["rank", "-4"]),
        (lambda: MoLoRAConfig(alpha=0), ["alpha", "> 0"]),
        (lambda: LoRAConfig(alpha=-16.0), ["alpha", "-16.0"]),
        (lambda: MoVConfig(num_experts=4, top_k=5), ["top_k=5", "num_experts=4"]),
        (lambda: MoVConfig(router_input="blok"), ["router_input", "'block'"]),
        (lambda: MoLoRAConfig(router_input="activation"), ["router_input", "input, sentence"]),
        (lambda: IA3Config(num_experts=4), ["MoVConfig(num_experts=4)"]),
        (lambda: LoRAConfig(num_experts=3), ["MoLoRAConfig(num_experts=3)"]),
        (lambda: LoRAConfig(top_k=1), ["no router", "top_k"]),
        (lambda: MoVConfig(target_modules=[]), ["target_modules", "non-empty"]),
        (lambda: MoLoRAConfig(dropout=1.0), ["dropout", "[0, 1)"]),
        # an infinite scale made the first forward NaN (inf * 0 at B = 0), reported as a lr problem
        (lambda: MoLoRAConfig(alpha=float("inf")), ["alpha", "finite", "inf"]),
        (lambda: MoLoRAConfig(init_std=float("inf")), ["init_std", "finite", "inf"]),
        (lambda: MoVConfig(router_init_std=float("inf")), ["router_init_std", "finite", "inf"]),
    ],
)
def test_bad_values_are_refused_with_the_value_and_the_fix(build, words):
    with pytest.raises(MoeforgeError) as err:
        build()
    for word in words:
        assert word in str(err.value)


def test_peft_section_unknown_key_names_the_closest_valid_key():
    with pytest.raises(MoeforgeError, match="unknown key 'num_expert'.*Did you mean 'num_experts'"):
        config_from_dict({"method": "mov", "num_expert": 10})
    with pytest.raises(MoeforgeError, match="Did you mean 'rank'"):
        config_from_dict({"method": "molora", "rnak": 4})
    with pytest.raises(MoeforgeError, match="unknown PEFT method 'molra'.*Did you mean 'molora'"):
        config_from_dict({"method": "molra"})
    with pytest.raises(MoeforgeError, match="no 'method'"):
        config_from_dict({"num_experts": 10})


def test_a_bad_value_in_a_section_names_the_section_not_the_python_class():
    with pytest.raises(MoeforgeError) as err:
        config_from_dict({"method": "mov", "num_experts": 0}, where="the peft section")
    assert str(err.value).startswith("the peft section (method mov): num_experts must be")
    assert "MoVConfig" not in str(err.value)
    with pytest.raises(MoeforgeError, match=r"^peft config \(method molora\): top_k"):
        config_from_dict({"method": "molora", "num_experts": 2, "top_k": 3})


def test_peft_section_builds_the_config_and_round_trips():
    cfg = config_from_dict({"method": "molora", "num_experts": 10, "rank": 4, "alpha": 16, "top_k": 2})
    assert isinstance(cfg, MoLoRAConfig) and cfg.top_k == 2 and cfg.scaling == 4.0
    assert config_from_dict(cfg.to_dict()) == cfg
    model = wrap_from_config(make_model("llama"), {"method": "mov", "num_experts": 3})
    assert isinstance(model.peft_config, MoVConfig) and model.peft_config.num_experts == 3


def test_family_defaults():
    llama, t5 = make_model("llama"), make_model("t5")
    assert default_targets(llama, "mov") == (["k_proj", "v_proj", "down_proj"], ["down_proj"])
    assert default_targets(llama, "lora")[0] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert default_targets(t5, "ia3") == (["k", "v", "wo"], ["wo"])
    # T5 v1.0 uses wi; wi_0/wi_1 (v1.1) are dropped because they do not exist
    assert default_targets(t5, "molora")[0] == ["q", "k", "v", "o", "wi", "wo"]


def test_unknown_family_without_targets_lists_linears():
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(MoeforgeError, match=r"no default target_modules.*proj"):
        wrap(Tiny(), MoVConfig(num_experts=2))
