"""Loading is strict: a checkpoint tensor the model does not use, or one the model needs and the
file lacks, is an error naming them, on every rank of a pipeline (each stage judges the whole
model, not its own layers), before any rank waits on another. strict=False loads what matches
and returns the list."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from galaxy.comm.context import ParallelContext
from galaxy.config.load import load_config
from galaxy.models.checkpoint import CheckpointError
from galaxy.models.llama import LlamaConfig, LlamaForCausalLM
from galaxy.plan import build_plan
from tests.helpers import run_ranks

SHAPE = dict(model="llama", hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=50, seq_length=8)


def llama(layers, world=1, rank=0):
    stages = {"stage_num_hidden_layers_list": [layers // 2, layers - layers // 2]} if world == 2 else {}
    cfg = load_config(None, {**SHAPE, "num_hidden_layers": layers, **stages})
    ctx = ParallelContext.create(build_plan(cfg, world), rank) if world > 1 else None
    return LlamaForCausalLM(LlamaConfig.from_dict(cfg), ctx)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Checkpoints of a 2-layer and a 4-layer model, and the 2-layer one with an extra tensor."""
    root = tmp_path_factory.mktemp("strict")
    for layers in (2, 4):
        llama(layers).save_hf(root / f"layers{layers}")
    tensors = load_file(root / "layers2" / "model-stage00-of-01.safetensors")
    tensors["model.layers.99.mlp.up_proj.weight"] = torch.zeros(48, 32)
    save_file(tensors, root / "extra.safetensors")
    return root


def test_layers_the_model_lacks_are_named(saved):
    with pytest.raises(CheckpointError, match=r"18 tensor\(s\) this model does not use: 'model\.layers\.2\."):
        llama(2).load_hf(saved / "layers4")


def test_an_extra_tensor_is_named(saved):
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) this model does not use: "
                                              r"'model\.layers\.99\.mlp\.up_proj\.weight'.*--strict false"):
        llama(2).load_hf(saved / "extra.safetensors")


def test_layers_the_file_lacks_are_named(saved):
    with pytest.raises(CheckpointError, match=r"18 tensor\(s\) missing: 'model\.layers\.2\."):
        llama(4).load_hf(saved / "layers2")


def test_not_strict_loads_what_matches_and_lists_the_rest(saved):
    model, full = llama(2), llama(4)
    full.load_hf(saved / "layers4")
    skipped = model.load_hf(saved / "layers4", strict=False)
    assert len(skipped) == 1 and skipped[0].startswith("18 tensor(s) this model does not use: 'model.layers.2.")
    assert "'model.layers.3.self_attn.v_proj.weight'" in skipped[0] and "more)" not in skipped[0]  # all listed
    assert torch.equal(model.model.layers["1"].attn.q.weight, full.model.layers["1"].attn.q.weight)


def _load_on_stage(rank, world, model_layers, path):
    try:
        llama(model_layers, world, rank).load_hf(path)
        return "loaded"
    except CheckpointError as e:
        return str(e)


def test_every_pipeline_stage_judges_the_whole_model(saved):
    """Stage 0 holds none of the missing or extra layers, and raises all the same (else it would
    wait for stage 1 in the first collective). An exact checkpoint loads on both stages."""
    for layers, path, expected in [(4, saved / "layers2", "18 tensor(s) missing: 'model.layers.2."),
                                   (2, saved / "extra.safetensors", "'model.layers.99.mlp.up_proj.weight'"),
                                   (2, saved / "layers4", "18 tensor(s) this model does not use"),
                                   (4, saved / "layers4", "loaded")]:
        for rank, message in enumerate(run_ranks(_load_on_stage, 2, layers, path)):
            assert expected in message, (rank, message)


def test_settings_no_shape_shows_must_agree_with_config_json(tmp_path):
    """A Llama 3 checkpoint (rope_theta 500000) fine-tuned from a config that leaves rope_theta at
    its default would load cleanly and run plain RoPE at 10000: named instead."""
    cfg = load_config(None, {**SHAPE, "num_hidden_layers": 2, "rope_theta": 500000.0})
    LlamaForCausalLM(LlamaConfig.from_dict(cfg)).save_hf(tmp_path)
    with pytest.raises(CheckpointError, match=r"rope_theta 500000\.0 there, 10000\.0 here"):
        llama(2).load_hf(tmp_path)


def test_a_bare_encoder_checkpoint_leaves_the_mlm_head_as_initialised(tmp_path):
    """As transformers' BertForMaskedLM.from_pretrained does with a BertModel checkpoint: the encoder's
    tensors (named without "bert.") load, the head the file has none of stays as initialised and is
    named; a file with part of a head is still an error."""
    from galaxy.models.bert import BertConfig, BertForMaskedLM, BertModel
    from galaxy.models.bert.model import to_hf
    from galaxy.models.checkpoint import save_checkpoint
    cfg = BertConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_hidden_layers=1, vocab_size=50)
    encoder = BertModel(cfg)
    torch.nn.init.normal_(encoder.embeddings.word_embeddings.weight)
    save_checkpoint(encoder, encoder.ctx, tmp_path / "bare", to_hf)
    model = BertForMaskedLM(cfg)
    head = model.cls.dense.weight.clone()
    skipped = model.load_hf(tmp_path / "bare")
    assert skipped == [_listed_head()]
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, encoder.embeddings.word_embeddings.weight)
    assert torch.equal(model.cls.dense.weight, head)
    tensors = load_file(tmp_path / "bare" / "model-stage00-of-01.safetensors")
    tensors["cls.predictions.bias"] = torch.zeros(50)
    save_file(tensors, tmp_path / "part_head.safetensors")
    with pytest.raises(CheckpointError, match=r"4 tensor\(s\) missing: 'cls\.predictions\.transform\.dense\.weight'"):
        BertForMaskedLM(cfg).load_hf(tmp_path / "part_head.safetensors")


def _listed_head():
    names = [("cls.predictions.bias", "cls.bias")] + [
        (f"cls.predictions.transform.{m}.{p}", f"cls.{m}.{p}") for m in ("dense", "LayerNorm") for p in ("weight", "bias")]
    return (f"{len(names)} tensor(s) missing, left as initialised (the checkpoint has none of them): "
            + ", ".join(f"'{hf}' (parameter '{ours}')" for hf, ours in names))
