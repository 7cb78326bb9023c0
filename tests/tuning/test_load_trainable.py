"""Trainable-only checkpoints (save_trainable_only) loaded back with load_trainable, across layouts.

Each tuned model is saved from Galaxy at world 2 (uneven heads, columns and positions) and loaded
into the serial model (here), into Galaxy at world 3 and into a 3-stage pipeline: the loss on the
same batch equals the saving run's (rel. error < 1e-5). The base weights come from a full
checkpoint (load_checkpoint) that differs from the initial values, and the trainable tensors get
nonzero values (a fresh lora_B / adapter_up / side_upsample is zero and would hide a missed load).
One spawn per world; the error cases run serial, plus one missing tensor seen by one pipeline stage only.
"""
import pytest
import torch
from safetensors.torch import load_file, save_file

from galaxy.comm.context import ParallelContext
from galaxy.config.load import load_config
from galaxy.data import SyntheticMLM
from galaxy.errors import ConfigError
from galaxy.models.bert import BertConfig, BertForMaskedLM
from galaxy.models.checkpoint import CheckpointError
from galaxy.models.llama import LlamaConfig, LlamaForCausalLM
from galaxy.pipeline import PipelineForwardBackward
from galaxy.plan import build_plan
from galaxy.train.loop import Trainer
from galaxy.tuning.apply import apply_tuning
from galaxy.tuning.keys import save_tuning_record
from tests.helpers import run_ranks
from tests.models.llama.common import MODEL as LLAMA_MODEL
from tests.models.llama.common import RandomInstructions
from tests.tuning.test_tuning_layouts import offset

TOL = 1e-5
ALL_LORA = ["query", "key", "value", "dense", "intermediate", "output"]
MODELS = {
    "bert": dict(model="bert", hidden_size=32, intermediate_size=48, num_attention_heads=4, num_hidden_layers=3,
                 vocab_size=64, seq_length=10, max_position_embeddings=16, batch_size=4, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0, data="synthetic"),
    "llama": {**LLAMA_MODEL, "num_hidden_layers": 3, "batch_size": 4, "gradient_accumulation_steps": 1},
}
METHODS = {"lora": {"use_lora": True, "lora_dim": 4, "lora_alpha": 8.0, "lora_targets": ALL_LORA},
           "adapter": {"use_adapter": True, "adapter_reduction_dim": 8},
           "side": {"use_side": True, "side_reduction_factor": 4}}
CASES = [("bert", "lora"), ("bert", "adapter"), ("bert", "side"), ("llama", "lora"), ("llama", "adapter"),
         ("llama", "side")]
LAYOUTS = {  # (model, world) -> layout name -> keys
    ("bert", 2): {"galaxy": {"parallel": "galaxy", "tp_num_attention_heads_list": [3, 1],
                             "tp_intermediate_size_list": [30, 18], "seq_scatter_list": [7, 3]}},
    ("llama", 2): {"galaxy": {"parallel": "galaxy", "tp_num_attention_heads_list": [6, 2],
                              "tp_intermediate_size_list": [60, 36], "seq_scatter_list": [14, 10]}},
    ("bert", 3): {"galaxy": {"parallel": "galaxy", "tp_num_attention_heads_list": [1, 2, 1],
                             "tp_intermediate_size_list": [8, 30, 10], "seq_scatter_list": [5, 3, 2]},
                  "pp": {"stage_num_hidden_layers_list": [1, 1, 1]}},
    ("llama", 3): {"galaxy": {"parallel": "galaxy", "tp_num_attention_heads_list": [4, 2, 2],
                              "tp_intermediate_size_list": [40, 32, 24], "seq_scatter_list": [10, 8, 6]},
                   "pp": {"stage_num_hidden_layers_list": [1, 1, 1]}},
}


def config(arch, method, layout=None, **extra):
    return load_config(None, {**MODELS[arch], **METHODS[method], **(layout or {}), "learning_rate": 0.0, **extra})


def build(arch, cfg, ctx):
    if arch == "bert":
        return BertForMaskedLM(BertConfig.from_dict(cfg), ctx)
    return LlamaForCausalLM(LlamaConfig.from_dict(cfg), ctx)


def tuned(arch, cfg, ctx, base):
    """The base checkpoint, then the tuning method, as the entry builds a run."""
    model = build(arch, cfg, ctx)
    model.load_hf(base)
    apply_tuning(model, cfg, model.ctx)
    return model


def loss(arch, cfg, model):
    """The loss of the first batch (learning_rate 0: a step through the layout's real schedule)."""
    data = SyntheticMLM(cfg["vocab_size"], cfg["seq_length"], 3) if arch == "bert" else \
        RandomInstructions(cfg["vocab_size"], cfg["seq_length"])
    trainer = Trainer(model, model.ctx, cfg, data, 1, log=lambda *_: None)
    if model.ctx.plan.pp_size > 1:
        trainer.forward_backward = PipelineForwardBackward(trainer)
    return trainer.train_step()["loss"]


def save_base(arch, path):
    """A full checkpoint whose weights differ from the initial ones."""
    model = build(arch, config(arch, "lora"), None)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(offset("base." + name, p))
    model.save_hf(path)


def _save_every_case(rank, world, root):
    out = {}
    for arch, method in CASES:
        cfg = config(arch, method, LAYOUTS[arch, world]["galaxy"])
        ctx = ParallelContext.create(build_plan(cfg, world), rank)
        model = tuned(arch, cfg, ctx, f"{root}/base_{arch}")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(offset(name, p))
        out[arch, method] = loss(arch, cfg, model)
        model.save_hf(f"{root}/{arch}_{method}", trainable_only=True)
    return out


def _load_every_case(rank, world, root):
    out = {}
    for arch, method in CASES:
        for name, layout in LAYOUTS[arch, world].items():
            cfg = config(arch, method, layout)
            model = tuned(arch, cfg, ParallelContext.create(build_plan(cfg, world), rank), f"{root}/base_{arch}")
            model.load_hf(f"{root}/{arch}_{method}", trainable_only=True)
            out[arch, method, name] = loss(arch, cfg, model)
    # a tensor only the last stage holds is missing: every stage reports it, none waits on the others
    cfg = config("bert", "lora", LAYOUTS["bert", world]["pp"])
    model = tuned("bert", cfg, ParallelContext.create(build_plan(cfg, world), rank), f"{root}/base_bert")
    try:
        model.load_hf(f"{root}/bert_lora_cut", trainable_only=True)
    except CheckpointError as e:
        out["missing on one stage"] = str(e)
    return out


def drop_tensor(src, dst, name):
    """A copy of trainable-only checkpoint src without tensor `name`, as one file."""
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    del tensors[name]
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"))
    return tensors


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainable")
    for arch in MODELS:
        save_base(arch, root / f"base_{arch}")
    losses = run_ranks(_save_every_case, 2, str(root), timeout_s=240.0)
    assert losses[0] == losses[1]
    drop_tensor(root / "bert_lora", root / "bert_lora_cut", "bert.encoder.layer.2.output.dense.lora_B")
    return root, losses[0]


def test_saved_in_galaxy_loads_serial_and_at_world_3(saved):
    root, want = saved
    for arch, method in CASES:
        cfg = config(arch, method)
        model = tuned(arch, cfg, None, root / f"base_{arch}")
        model.load_hf(root / f"{arch}_{method}", trainable_only=True)
        got = loss(arch, cfg, model)
        assert abs(got - want[arch, method]) <= TOL * abs(want[arch, method]), (arch, method, "serial", got, want)
    results = run_ranks(_load_every_case, 3, str(root), timeout_s=240.0)
    for rank, out in enumerate(results):
        for arch, method in CASES:
            for layout in LAYOUTS[arch, 3]:
                got, ref = out[arch, method, layout], want[arch, method]
                assert abs(got - ref) <= TOL * abs(ref), (arch, method, layout, rank, got, ref)
        assert "1 tensor(s) missing: 'bert.encoder.layer.2.output.dense.lora_B'" in out["missing on one stage"], rank
    assert len({out["missing on one stage"] for out in results}) == 1  # the same message on every stage


def test_a_trainable_file_that_does_not_fit_is_refused(saved):
    root, _ = saved
    lora_file = root / "bert_lora"
    other_rank = tuned("bert", config("bert", "lora", lora_dim=2), None, root / "base_bert")
    with pytest.raises(CheckpointError, match=r"36 tensor\(s\) of another shape: 'bert.encoder.layer.0.attention.self."
                                              r"query.lora_A' \(parameter '.*'\) is \(4, 32\) in the checkpoint, "
                                              r"\(2, 32\) in the model"):
        other_rank.load_hf(lora_file, trainable_only=True)
    adapter_run = tuned("bert", config("bert", "adapter"), None, root / "base_bert")
    with pytest.raises(CheckpointError, match=r"24 tensor\(s\) missing: 'bert.encoder.layer.0.con1.adapter.*"
                                              r"36 tensor\(s\) this model does not train: 'bert.*lora_A'"):
        adapter_run.load_hf(lora_file, trainable_only=True)
    lora_run = tuned("bert", config("bert", "lora"), None, root / "base_bert")
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) missing: 'bert.encoder.layer.2.output.dense.lora_B'"):
        lora_run.load_hf(root / "bert_lora_cut", trainable_only=True)


def test_tuning_json_must_match_the_run(tmp_path):
    save_tuning_record(config("bert", "lora"), tmp_path)
    assert config("bert", "lora", load_trainable=str(tmp_path))["load_trainable"] == str(tmp_path)
    with pytest.raises(ConfigError, match=r"was saved with other tuning \(tuning.json\): lora_dim 4 there, 8 here"):
        config("bert", "lora", load_trainable=str(tmp_path), lora_dim=8)
    with pytest.raises(ConfigError, match=r"method 'use_lora' there, 'use_adapter' here"):
        config("bert", "adapter", load_trainable=str(tmp_path))
