"""Layer table, stage shapes and memory estimate of scvit_core.summary, on the meta device."""

import pytest

from scvit_core.config import ScViTConfig
from scvit_core.flops import total_forward_flops
from scvit_core.summary import layer_table, stage_shapes, training_memory


def test_paper_layer_table_adds_up():
    config = ScViTConfig.paper()
    table = layer_table(config)
    assert table["parameters"].sum() == 125_611_052  # as derived in test_model.py
    assert table["forward FLOPs"].sum() == total_forward_flops(config)
    assert table["layer"].iloc[0] == "stem.conv" and table["layer"].iloc[-1] == "output"
    head = table.set_index("layer").loc["head"]
    assert head["output shape"] == "(40, 4461)"  # 3 x ceil(59,480 / 40) per token
    assert head["parameters"] == 40 * 500 * 3 * 1487


@pytest.mark.parametrize(
    "switches",
    [
        {"attention": False},
        {"conv_stem": False},
        {"patchwise": False},
        {"extra_convs": 2},
        {"width": 1.5},
        {"likelihood": "nb"},
    ],
)
def test_layer_table_of_ablations(switches):
    config = ScViTConfig.for_genes(300, **switches)
    table = layer_table(config)  # checks internally that every parameter is in a row
    assert table["forward FLOPs"].sum() == total_forward_flops(config)
    assert table["layer"].is_unique


def test_stage_shapes_follow_the_config():
    config = ScViTConfig.for_genes(4000)
    shapes = dict(stage_shapes(config))
    assert shapes["genes"] == (4000,)
    assert shapes["stem"] == (40, config.token_length)
    assert shapes["encoder.3"] == (20, 5)
    assert shapes["bottleneck.2"] == (64,)
    assert shapes["output"] == (3, 4000)


def test_training_memory_scales_with_batch():
    config = ScViTConfig.for_genes(400)
    small, large = training_memory(config, 8), training_memory(config, 32)
    n_params = sum(layer_table(config)["parameters"])
    assert small["weights"] == small["gradients"] == 4 * n_params
    assert small["adamw moments"] == 8 * n_params
    assert large["weights"] == small["weights"]
    assert large["activations"] == 4 * small["activations"]
    assert large["likelihood"] == 4 * small["likelihood"] > 0
