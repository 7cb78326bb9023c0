"""Every layout of BERT against the serial model: same seed, weights and batches ->
same losses over 2 optimizer steps and same gradients, at world 2 and 3 with uneven splits and
at world 4 with 2 data-parallel replicas (of Galaxy, of Galaxy with ZeRO-2, of a pipeline), with
dropout on: a sample draws the same masks on any replica, micro-step and pipeline micro-batch, so
accumulating 2 micro-steps equals one batch of the same samples too."""
import pytest

from galaxy.comm.context import ParallelContext
from galaxy.config.load import load_config
from galaxy.data import SyntheticMLM
from galaxy.models.bert import BertConfig, BertForMaskedLM
from galaxy.models.bert.model import mlm_to_hf
from galaxy.models.checkpoint import gather_full_state
from galaxy.pipeline import PipelineForwardBackward
from galaxy.plan import build_plan
from galaxy.train.loop import Trainer
from tests.helpers import rel_err, run_ranks

MODEL = dict(hidden_size=64, num_attention_heads=4, intermediate_size=512, num_hidden_layers=2, vocab_size=100,
             seq_length=128, max_position_embeddings=128, batch_size=6, gradient_accumulation_steps=2,
             hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, data="synthetic", warmup_steps=1,
             max_grad_norm=1.0, bucket_size_mb=0.01)
SPLITS = {2: dict(tp_num_attention_heads_list=[3, 1], tp_intermediate_size_list=[384, 128], seq_scatter_list=[80, 48]),
          3: dict(tp_num_attention_heads_list=[2, 1, 1], tp_intermediate_size_list=[256, 128, 128],
                  seq_scatter_list=[64, 32, 32])}
LAYOUTS = ["tp", "sp", "galaxy", "galaxy2", "dp"]
WORLD4 = {"galaxy x dp": dict(parallel="galaxy", data_parallel_size=2, **SPLITS[2]),  # 2 tensor ranks x 2 replicas
          "galaxy x dp, zero 2": dict(parallel="galaxy", data_parallel_size=2, zero_stage=2, zero_shard_list=[0.7, 0.3],
                                      **SPLITS[2]),
          # 2 stages x 2 replicas; a replica's 3 samples of a micro-step run as 3 pipeline micro-batches
          "pp x dp": dict(stage_num_hidden_layers_list=[1, 1], num_microbatches=3, data_parallel_size=2)}


def config(layout, world):
    extra = {} if layout in ("serial", "dp") else SPLITS[world]
    return load_config(None, {**MODEL, **extra, "parallel": layout})


def train_two_steps(cfg, plan, rank):
    """Losses of 2 optimizer steps, the gradients (full, HF-named; of this pipeline stage; none under
    ZeRO-2, which keeps a shard) of the second, and the shapes of this rank's first-layer parameters."""
    ctx = ParallelContext.create(plan, rank)
    model = BertForMaskedLM(BertConfig.from_dict(cfg), ctx)
    data = SyntheticMLM(cfg["vocab_size"], cfg["seq_length"], cfg["seed"], num_samples=64)
    trainer = Trainer(model, ctx, cfg, data, total_steps=2, log=lambda m: None)
    if plan.pp_size > 1:
        trainer.forward_backward = PipelineForwardBackward(trainer)
    grads = {}
    if cfg["zero_stage"] < 2:
        trainer.before_update = lambda: grads.update(gather_full_state(model, ctx, mlm_to_hf, lambda p: p.grad))
    losses = [trainer.train_step()["loss"] for _ in range(2)]
    return losses, grads, {n: tuple(p.shape) for n, p in model.named_parameters() if ".layer.0." in n}


def _all_layouts(rank, world):
    out = {}
    for layout in LAYOUTS:
        cfg = config(layout, world)
        out[layout] = train_two_steps(cfg, build_plan(cfg, world), rank)
    return out


def check_shard_shapes(shapes, split, rank, layout):
    layer = "bert.encoder.layer.0."
    head_dim = MODEL["hidden_size"] // MODEL["num_attention_heads"]
    rows = split["tp_num_attention_heads_list"][rank] * head_dim
    for proj in "qkv":
        assert shapes[layer + f"attn.{proj}.weight"] == (rows, MODEL["hidden_size"]), layout
    assert shapes[layer + "attn.o.weight"] == (MODEL["hidden_size"], rows), layout
    columns = split["tp_intermediate_size_list"][rank] if layout != "galaxy2" else MODEL["intermediate_size"]
    assert shapes[layer + "mlp.up.weight"] == (columns, MODEL["hidden_size"]), layout


@pytest.fixture(scope="module")
def serial():
    cfg = config("serial", 1)
    return train_two_steps(cfg, build_plan(cfg, 1), 0)


@pytest.mark.parametrize("world", [2, 3])
def test_layouts_match_serial(world, serial):
    results = run_ranks(_all_layouts, world, timeout_s=300)
    for rank, per_layout in enumerate(results):
        for layout, (losses, grads, shapes) in per_layout.items():
            assert_same(losses, grads, serial, (layout, rank))
            assert grads.keys() == serial[1].keys(), layout
            if layout in ("tp", "galaxy", "galaxy2"):  # a rank holds its share of Q, K, V, O (and MLP)
                check_shard_shapes(shapes, SPLITS[world], rank, layout)


def _world4(rank, world):
    cfgs = {name: load_config(None, {**MODEL, **keys}) for name, keys in WORLD4.items()}
    return {name: train_two_steps(cfg, build_plan(cfg, world), rank) for name, cfg in cfgs.items()}


def test_layouts_times_data_parallel_match_serial(serial):
    results = run_ranks(_world4, 4, timeout_s=300)
    for rank, per_layout in enumerate(results):
        for layout, (losses, grads, _) in per_layout.items():
            assert_same(losses, grads, serial, (layout, rank))
    for layout in WORLD4:  # the stages' gradients together are the model's
        covered = set().union(*(per_layout[layout][1] for per_layout in results))
        assert covered == (set() if "zero" in layout else serial[1].keys()), layout


def test_accumulation_matches_one_batch(serial):
    """Serial, 1 micro-step of 12 samples = the reference's 2 micro-steps of 6 (the same samples)."""
    cfg = load_config(None, {**MODEL, "batch_size": 12, "gradient_accumulation_steps": 1})
    losses, grads, _ = train_two_steps(cfg, build_plan(cfg, 1), 0)
    assert_same(losses, grads, serial, "accumulation 1")
    assert grads.keys() == serial[1].keys()


def assert_same(losses, grads, serial, where):
    ref_losses, ref_grads, _ = serial
    for got, want in zip(losses, ref_losses, strict=True):
        assert abs(got - want) / abs(want) < 1e-5, (where, losses, ref_losses)
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < 1e-5, (where, name, rel_err(g, ref_grads[name]))
