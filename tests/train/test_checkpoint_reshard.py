"""A training checkpoint resumes in another world and plan: saved by 3 uneven Galaxy ranks, read by
2 ranks of another uneven split (and by TP, and by a pipeline), the following steps' losses equal an
uninterrupted world-3 run's and serial's; so does ZeRO-3 data parallelism read as Galaxy (slow), and so do
LLaMA with GQA (head splits move whole KV groups; tied or untied head) and LoRA on sharded projections (each
rank reads its slices of lora_A / lora_B and of their AdamW moments). Dropout is on (hidden, attention, LoRA):
masks follow the sample, so they carry over to any world, data-parallel count included. Checkpoints written
before shards were recorded, or a changed non-layout key, are refused by name."""
import json

import pytest

from galaxy.models.checkpoint import CheckpointError
from galaxy.train import checkpoint
from tests.helpers import run_ranks
from tests.train.test_checkpoint import TOTAL, make_trainer, tiny_cfg, train

SAVED_AT = 3
MODEL = {"num_attention_heads": 4}  # dropout on (tiny_cfg): masks follow the sample, not the layout
GALAXY3 = {"parallel": "galaxy", "tp_num_attention_heads_list": [2, 1, 1], "tp_intermediate_size_list": [64, 32, 32],
           "seq_scatter_list": [12, 10, 10]}
LAYOUTS2 = {
    "galaxy": {"parallel": "galaxy", "tp_num_attention_heads_list": [1, 3], "tp_intermediate_size_list": [100, 28],
               "seq_scatter_list": [20, 12]},
    "tp": {"parallel": "tp", "tp_num_attention_heads_list": [3, 1], "tp_intermediate_size_list": [50, 78]},
    "pp": {"stage_num_hidden_layers_list": [1, 1], "num_microbatches": 2},
}


# 8 query heads in 4 KV groups of 2: rank 0 of [4, 2, 2] holds KV heads 0-1, rank 1 of [2, 6] KV heads 1-3
LLAMA = {"model": "llama", "num_attention_heads": 8, "num_key_value_heads": 4, "intermediate_size": 96,
         "seq_length": 24, "rope_theta": 500000.0, "hidden_act": "silu",
         # a learning rate at which a lost key projection's AdamW moments change the next losses by > 1e-5;
         # eps as in tests/models/llama/common.py (1e-8 amplifies the rounding of gradients that cancel)
         "learning_rate": 1e-2, "adam_eps": 1e-6}
LORA = {"use_lora": True, "lora_dim": 4, "lora_alpha": 8.0, "lora_dropout": 0.1,
        "lora_targets": ["query", "key", "value", "dense", "intermediate", "output"]}
RESHARD_CASES = {  # name: (model and tuning, world-3 layout, world-2 layout)
    "llama_gqa_galaxy_to_galaxy": (LLAMA, {**GALAXY3, "tp_num_attention_heads_list": [4, 2, 2],
                                           "tp_intermediate_size_list": [48, 24, 24], "seq_scatter_list": [10, 8, 6]},
                                   {"parallel": "galaxy", "tp_num_attention_heads_list": [2, 6],
                                    "tp_intermediate_size_list": [20, 76], "seq_scatter_list": [6, 18]}),
    "llama_gqa_tied_lora_tp_to_galaxy": ({**LLAMA, **LORA, "tie_word_embeddings": True},
                                         {"parallel": "tp", "tp_num_attention_heads_list": [2, 2, 4],
                                          "tp_intermediate_size_list": [16, 56, 24]},
                                         {"parallel": "galaxy", "tp_num_attention_heads_list": [6, 2],
                                          "tp_intermediate_size_list": [60, 36], "seq_scatter_list": [14, 10]}),
    "bert_lora_galaxy_to_tp": (LORA, GALAXY3, LAYOUTS2["tp"]),
    "bert_adapter_galaxy_to_galaxy": ({"use_adapter": True, "adapter_reduction_dim": 8}, GALAXY3, LAYOUTS2["galaxy"]),
}
SLOW_CASES = {"bert_adapter_galaxy_to_galaxy"}  # adapters are held whole (no slices): CI time goes elsewhere


def cfg(**layout):
    return tiny_cfg(**{**MODEL, **layout})


def straight_with_save(rank, world, config, save_dir):
    """An uninterrupted run that saves a checkpoint at step SAVED_AT on the way."""
    trainer = make_trainer(config, rank, world)
    losses = train(trainer, SAVED_AT)
    checkpoint.save(trainer, save_dir)
    return losses + train(trainer, TOTAL)


def resumed(rank, world, config, save_dir):
    trainer = make_trainer(config, rank, world)
    return checkpoint.resume(trainer, save_dir), train(trainer, TOTAL)


@pytest.fixture(scope="module")
def saved3(tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("galaxy3")
    straight = run_ranks(straight_with_save, 3, cfg(**GALAXY3), str(save_dir))[0]
    return save_dir, straight


def rel(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("layout", [*sorted(set(LAYOUTS2) - {"pp"}), pytest.param("pp", marks=pytest.mark.slow)])
def test_world3_galaxy_resumes_at_world2_in_another_layout(saved3, layout):
    save_dir, straight = saved3
    results = run_ranks(resumed, 2, cfg(**LAYOUTS2[layout]), str(save_dir))
    serial = train(make_trainer(cfg()), TOTAL)
    for step, losses in results:
        assert step == SAVED_AT
        assert rel(losses, straight[SAVED_AT:]) < 1e-5
        assert rel(losses, serial[SAVED_AT:]) < 1e-5


def test_serial_resumes_world3_checkpoint(saved3):
    save_dir, straight = saved3
    trainer = make_trainer(cfg())
    assert checkpoint.resume(trainer, save_dir) == SAVED_AT
    assert rel(train(trainer, TOTAL), straight[SAVED_AT:]) < 1e-5


def test_checkpoint_records_each_tensors_shard(saved3):
    save_dir, _ = saved3
    state = json.loads((save_dir / f"step-{SAVED_AT:08d}" / "rank-00001.state.json").read_text())
    assert state["shards"]["bert.encoder.layer.0.attn.q.weight"] == ["bert.encoder.layer.0.attn.q.weight",
                                                                     [0, 32, 16, 64]]  # head 2 of 4, 16 wide
    assert state["shards"]["bert.embeddings.LayerNorm.weight"] == ["bert.embeddings.LayerNorm.weight", None]


def test_old_checkpoint_or_changed_model_is_refused_in_another_layout(saved3, tmp_path):
    save_dir, _ = saved3
    with pytest.raises(CheckpointError, match=r"hidden_size: 64 -> 32"):
        checkpoint.resume(make_trainer(cfg(hidden_size=32)), save_dir)
    copy = tmp_path / f"step-{SAVED_AT:08d}"
    copy.mkdir()
    for f in (save_dir / copy.name).iterdir():
        text = f.read_bytes()
        if f.name.endswith(".state.json"):  # as written before shards were recorded
            state = json.loads(text)
            del state["shards"]
            text = json.dumps(state).encode()
        (copy / f.name).write_bytes(text)
    manifest = json.loads((copy / checkpoint.MANIFEST).read_text())
    manifest["files"] = {name: checkpoint.sha256(copy / name) for name in manifest["files"]}
    (copy / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="resumes only in its own world and plan"):
        checkpoint.resume(make_trainer(cfg()), tmp_path)


@pytest.mark.slow  # 3 more ranks to start: ~30 s of CPU
def test_zero3_data_parallel_resumes_as_galaxy(tmp_path):
    """ZeRO-3 replicas (each holding a slice of the flat parameters between steps) save whole
    tensors; two Galaxy ranks read their shards of them."""
    batch = {"batch_size": 6}
    zero3 = cfg(**batch, parallel="dp", zero_stage=3, zero_shard_list=[0.5, 0.3, 0.2])
    straight = run_ranks(straight_with_save, 3, zero3, str(tmp_path))[0]
    results = run_ranks(resumed, 2, cfg(**batch, **LAYOUTS2["galaxy"]), str(tmp_path))
    serial = train(make_trainer(cfg(**batch)), TOTAL)
    for step, losses in results:
        assert step == SAVED_AT and rel(losses, straight[SAVED_AT:]) < 1e-5 and rel(losses, serial[SAVED_AT:]) < 1e-5


@pytest.mark.parametrize("case", [pytest.param(c, marks=[pytest.mark.slow] if c in SLOW_CASES else [])
                                  for c in sorted(RESHARD_CASES)])
def test_llama_and_tuned_models_resume_at_world2_in_another_layout(case, tmp_path):
    model, layout3, layout2 = RESHARD_CASES[case]
    straight = run_ranks(straight_with_save, 3, cfg(**model, **layout3), str(tmp_path))[0]
    results = run_ranks(resumed, 2, cfg(**model, **layout2), str(tmp_path))
    serial = train(make_trainer(cfg(**model)), TOTAL)
    for step, losses in results:
        assert step == SAVED_AT
        assert rel(losses, straight[SAVED_AT:]) < 1e-5, (losses, straight)
        assert rel(losses, serial[SAVED_AT:]) < 1e-5, (losses, serial)
