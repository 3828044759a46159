"""Preset parameter counts: the config's arithmetic against a real module tree on the meta device."""
import pytest
import torch

from mlx_megalodon.config import PRESETS, parameter_count, preset
from torch_ref import Mega


def module_parameter_count(args) -> int:
    with torch.device("meta"):
        model = Mega(args)
    return sum(p.numel() for p in model.parameters())   # a shared embedding counts once


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_counts_match_the_module_tree(name):
    args = preset(name, vocab_size=32000)
    assert parameter_count(args) == module_parameter_count(args)


def test_published_sizes():
    # upstream ModelStore names these by size: mega200M ~ 0.22B and mega7.3B ~ 7.39B with V=32000
    assert parameter_count(preset("mega200M")) == 220_627_968
    assert parameter_count(preset("mega7.3B")) == 7_385_817_088
    assert parameter_count(preset("mega7.1B")) == 7_117_381_632
    assert parameter_count(preset("mega1.3B")) == 1_342_832_640


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown preset 'mega9B'"):
        preset("mega9B")
