"""CALMConfig: layer spacing by hand, validation messages."""

import pytest

from moeforge.compose.config import CALMConfig, evenly_spaced_layers
from moeforge.errors import MoeforgeError


def test_every_n_over_k_th_layer():
    # the outputs of layers N/n, 2N/n, ..., N (1-based)
    assert evenly_spaced_layers(12, 3) == [3, 7, 11]
    assert evenly_spaced_layers(30, 10) == [2, 5, 8, 11, 14, 17, 20, 23, 26, 29]
    assert evenly_spaced_layers(4, 4) == [0, 1, 2, 3]
    assert evenly_spaced_layers(5, 2) == [1, 4]


def test_layer_pairs_for_different_depths():
    assert CALMConfig(num_connections=2).layer_pairs(2, 4) == [(0, 1), (1, 3)]
    explicit = CALMConfig(num_connections=2, augmenting_layers=[0, 1], anchor_layers=[0, 2])
    assert explicit.layer_pairs(2, 4) == [(0, 0), (1, 2)]


def test_more_connections_than_layers():
    with pytest.raises(MoeforgeError, match=r"num_connections=3 is more than the 2 layers of the augmenting model "
                                            r"and the 4 of the anchor allow.*<= 2"):
        CALMConfig(num_connections=3).layer_pairs(2, 4)
    with pytest.raises(MoeforgeError, match=r"num_connections=5 is more than the 8 layers .* the 4 of the anchor.*<= 4"):
        CALMConfig(num_connections=5).layer_pairs(8, 4)
    # explicit layer lists set the number of connections
    assert CALMConfig(augmenting_layers=[0, 1], anchor_layers=[1, 3]).num_connections == 2


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"num_connections": 0}, "positive integer"),
        ({"num_connections": 2, "anchor_layers": [1]}, "lists 1 layers but num_connections=2"),
        ({"num_connections": 2, "anchor_layers": [2, 1]}, "strictly increasing"),
        ({"num_heads": 0}, "num_heads"),
        ({"dropout": 1.5}, "dropout"),
        ({"init_std": float("inf")}, "init_std must be a finite number > 0, got inf"),
        ({"anchor_layers": [True, 2]}, r"anchor_layers must be a list of 0-based layer indices, got \[True, 2\]"),
    ],
)
def test_invalid_values(fields, message):
    with pytest.raises(MoeforgeError, match=message):
        CALMConfig(**fields)


def test_explicit_layer_out_of_range():
    with pytest.raises(MoeforgeError, match="names layer 7, but the anchor model has layers 0..3"):
        CALMConfig(num_connections=1, anchor_layers=[7]).layer_pairs(2, 4)


def test_unknown_key_names_the_closest():
    with pytest.raises(MoeforgeError, match="unknown compose setting 'num_conections'. Did you mean 'num_connections'"):
        CALMConfig.from_dict({"num_conections": 2})
    cfg = CALMConfig.from_dict({"num_connections": 2, "augmenting": "x"}, extra_keys=("augmenting",))
    assert CALMConfig.from_dict(cfg.to_dict()) == cfg


def test_compose_settings_override_a_config(anchor, augmenting):
    from moeforge.compose import compose

    base = CALMConfig(num_connections=2, norm=False)
    composed = compose(anchor, augmenting, config=base, anchor_layers=[0, 2])
    assert composed.layer_pairs == [(0, 0), (1, 2)] and composed.calm_config.norm is False
    with pytest.raises(MoeforgeError, match="Did you mean 'norm'"):
        compose(anchor, augmenting, config=base, nrom=True)
