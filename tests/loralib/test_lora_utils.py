import pytest
import torch.nn as nn

from galaxy.loralib import Linear, lora_state_dict, mark_only_lora_as_trainable


def _model():
    # adapted (LoRA) linear, plain linear, and a LayerNorm with a bias of its own
    return nn.Sequential(Linear(8, 8, r=2), nn.Linear(8, 8), nn.LayerNorm(8))


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bias, expected_biases", [
    ("none", set()),
    ("all", {"0.bias", "1.bias", "2.bias"}),
    ("lora_only", {"0.bias"}),
])
def test_mark_only_lora_as_trainable(bias, expected_biases):
    model = _model()
    mark_only_lora_as_trainable(model, bias=bias)
    assert _trainable(model) == {"0.lora_A", "0.lora_B"} | expected_biases
    assert set(lora_state_dict(model, bias=bias)) == {"0.lora_A", "0.lora_B"} | expected_biases


def test_unknown_bias_mode_raises_and_changes_nothing():
    model = _model()
    before = _trainable(model)
    with pytest.raises(ValueError, match="'some'"):
        mark_only_lora_as_trainable(model, bias="some")
    with pytest.raises(ValueError, match="'some'"):
        lora_state_dict(model, bias="some")
    assert _trainable(model) == before
