"""The prototype's documented loralib calls, as its README and galaxy/loralib/README.md write them."""
import torch
import torch.nn as nn

from galaxy.loralib.layers import Linear as LoraLinear
from galaxy.loralib.utils import lora_state_dict, mark_only_lora_as_trainable


def test_readme_usage_trains_only_lora_and_reloads_from_lora_state_dict(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(LoraLinear(16, 32, r=16, lora_alpha=32), nn.ReLU(), nn.Linear(32, 4))
    pretrained = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    mark_only_lora_as_trainable(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"0.lora_A", "0.lora_B"}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    for _ in range(3):  # the training loop
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in pretrained.items())  # the rest stays frozen
    torch.save(lora_state_dict(model), tmp_path / "lora.pt")
    fresh = nn.Sequential(LoraLinear(16, 32, r=16, lora_alpha=32), nn.ReLU(), nn.Linear(32, 4))
    fresh.load_state_dict(pretrained, strict=False)
    fresh.load_state_dict(torch.load(tmp_path / "lora.pt"), strict=False)
    torch.testing.assert_close(fresh(x), model(x))
    model.eval(), fresh.eval()  # merged into W (merge_weights defaults to True): same outputs
    assert model[0].merged
    torch.testing.assert_close(fresh(x), model(x))
