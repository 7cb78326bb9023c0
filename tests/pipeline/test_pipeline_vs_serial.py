"""Pipeline training equals serial training: loss, every gradient (tied embeddings included)
and the weights after two optimizer steps, for GPipe, 1F1B and ZB-H1, uneven stages, PP x DP.
Also: checkpoints move between serial and pipeline layouts, and 1F1B bounds live activations."""
import json

import pytest
import torch

from galaxy.comm.context import ParallelContext
from galaxy.config.load import load_config
from galaxy.data import SyntheticMLM
from galaxy.errors import ConfigError
from galaxy.layers.param_spec import spec_of
from galaxy.models.bert import BertConfig, BertForMaskedLM
from galaxy.pipeline import PipelineForwardBackward
from galaxy.plan import build_plan
from galaxy.train.loop import Trainer
from tests.helpers import rel_err, run_ranks

TOL = 1e-5
SCHEDULES = ("gpipe", "1f1b", "zb-h1")
INTERLEAVED = dict(num_hidden_layers=7, batch_size=12)
ZERO_GRAD = 1e-6  # below this a gradient norm is rounding noise; Adam would turn it into full steps
SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=4, vocab_size=64,
             seq_length=16, max_position_embeddings=32, batch_size=8, hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0, data="synthetic", warmup_steps=1, max_grad_norm=1.0, seed=3)


def make_cfg(**overrides):
    return load_config(None, {**SMALL, **overrides})


def train(cfg, world, rank, steps=2, load=None):
    """Train `steps` optimizer steps; return losses, grads per step under serial names, final weights."""
    plan = build_plan(cfg, world)
    ctx = ParallelContext.create(plan, rank)
    model = BertForMaskedLM(BertConfig.from_dict(cfg), ctx)
    if load:
        model.load_hf(load)
    loaded = _weights(model)
    trainer = Trainer(model, ctx, cfg, SyntheticMLM(cfg["vocab_size"], cfg["seq_length"], cfg["seed"]),
                      steps, log=lambda *_: None)
    pipe = None
    if plan.pp_size > 1:
        pipe = trainer.forward_backward = PipelineForwardBackward(trainer)
    grads = []  # as the optimizer takes them: synced and clipped
    trainer.before_update = lambda: grads.append({_serial_name(n, p): p.grad.clone()
                                                  for n, p in model.named_parameters()})
    losses = [trainer.train_step()["loss"] for _ in range(steps)]
    if pipe:  # every receive the schedule posted ahead was consumed by its action
        assert not any(pipe.links.posted.values()), pipe.links.posted
    return {"losses": losses, "grads": grads, "weights": _weights(model), "loaded": loaded,
            "peak": pipe.stats.peak_live if pipe else None, "model": model}


def _serial_name(name, p):
    return spec_of(p).init_name or name


def _weights(model):
    return {_serial_name(n, p): p.detach().clone() for n, p in model.named_parameters()}


def _serial(tmp_path_factory, **overrides):
    """A checkpoint unlike the seeded init (so loading is really tested), and serial training from it."""
    ckpt = tmp_path_factory.mktemp("serial")
    model = BertForMaskedLM(BertConfig.from_dict(make_cfg(**overrides)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_hf(ckpt)
    out = _strip(train(make_cfg(**overrides), 1, 0, load=str(ckpt)))
    out["ckpt"] = str(ckpt)
    return out


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    return _serial(tmp_path_factory)


@pytest.fixture(scope="module")
def serial7(tmp_path_factory):
    """Seven layers: enough for two uneven chunks per rank on three ranks; 12 samples: 2 x S micro-batches."""
    return _serial(tmp_path_factory, **INTERLEAVED)


def _compare(results, serial):
    for r in results:
        for name, w in r["loaded"].items():  # the decoder copy loads from the embeddings
            assert torch.equal(w, serial["loaded"][name]), name
        for got, want in zip(r["losses"], serial["losses"], strict=True):
            assert abs(got - want) / abs(want) < TOL, (r["losses"], serial["losses"])
        for step, (got, want) in enumerate(zip(r["grads"], serial["grads"], strict=True)):
            for name, g in got.items():
                assert _grad_err(g, want[name]) < TOL, f"step {step + 1} grad {name}: {_grad_err(g, want[name])}"
        for name, w in r["weights"].items():
            if all(g[name].norm() > ZERO_GRAD for g in serial["grads"]):
                assert rel_err(w, serial["weights"][name]) < TOL, f"weight {name}"
    # together the stages hold every serial parameter (the tied decoder maps onto the embeddings)
    assert set().union(*(r["grads"][-1] for r in results)) == set(serial["grads"][-1])


def _grad_err(got, want):
    """Relative error, floored for gradients that are zero in exact arithmetic (the key bias:
    softmax ignores a per-query constant), where both sides hold only rounding noise ~1e-13."""
    return ((got - want).double().norm() / max(want.double().norm().item(), ZERO_GRAD)).item()


def _strip(result):
    result.pop("model")
    return result


def _pipeline_ranks(rank, world, stages, serial_ckpt, save_dir):
    out = {}
    for schedule in SCHEDULES:
        cfg = make_cfg(stage_num_hidden_layers_list=stages, num_microbatches=4, pipeline_schedule=schedule)
        result = train(cfg, world, rank, load=serial_ckpt)
        if schedule == "1f1b":
            result["model"].save_hf(save_dir)
        out[schedule] = _strip(result)
        # one step with 8 micro-batches: how many are alive at once on each stage
        cfg8 = make_cfg(stage_num_hidden_layers_list=stages, num_microbatches=8, pipeline_schedule=schedule)
        out[schedule + "_peak8"] = train(cfg8, world, rank, steps=1)["peak"]
    return out


@pytest.mark.parametrize("stages", [[3, 1], [2, 1, 1]])
def test_pipeline_equals_serial(stages, serial, tmp_path):
    pp_ckpt = tmp_path / "pp"
    results = run_ranks(_pipeline_ranks, len(stages), stages, serial["ckpt"], str(pp_ckpt), timeout_s=240)
    for schedule in SCHEDULES:
        _compare([r[schedule] for r in results], serial)

    # what the stages saved loads into the serial model as exactly their weights
    index = json.loads((pp_ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert "cls.predictions.decoder.weight" not in index  # the tied copy is saved once, as the embeddings
    assert len(set(index.values())) == len(stages)
    reloaded = BertForMaskedLM(BertConfig.from_dict(make_cfg()))
    reloaded.load_hf(pp_ckpt)
    for name, p in reloaded.named_parameters():
        want = [r["1f1b"]["weights"][name] for r in results if name in r["1f1b"]["weights"]]
        assert all(torch.equal(p.detach(), w) for w in want) and want, name

    # 1F1B holds at most num_stages micro-batches on stage 0; GPipe holds all 8
    assert results[0]["1f1b_peak8"] == len(stages)
    assert [r["1f1b_peak8"] for r in results] == list(range(len(stages), 0, -1))
    assert all(r["gpipe_peak8"] == 8 for r in results)


def _interleaved_ranks(rank, world, stages, serial_ckpt):
    cfg = make_cfg(**INTERLEAVED, stage_num_hidden_layers_list=stages, num_microbatches=world * 2,
                   pipeline_schedule="interleaved-1f1b", virtual_stages=2)
    return _strip(train(cfg, world, rank, load=serial_ckpt))


@pytest.mark.parametrize("stages", [[2, 1, 3, 1], [2, 1, 1, 1, 1, 1]])
def test_interleaved_equals_serial(stages, serial7):
    """Two chunks per rank (rank r holds model stages r and S + r), uneven layers; at two ranks
    activations and gradients cross the same pair of ranks both ways."""
    _compare(run_ranks(_interleaved_ranks, len(stages) // 2, stages, serial7["ckpt"], timeout_s=240), serial7)


def _pp_dp_ranks(rank, world, serial_ckpt):
    cfg = make_cfg(stage_num_hidden_layers_list=[3, 1], num_microbatches=2, pipeline_schedule="1f1b")
    return _strip(train(cfg, world, rank, load=serial_ckpt))


def test_pipeline_times_data_parallel_equals_serial(serial):
    assert build_plan(make_cfg(stage_num_hidden_layers_list=[3, 1]), 4).dp_size == 2
    _compare(run_ranks(_pp_dp_ranks, 4, serial["ckpt"], timeout_s=240), serial)


def test_microbatches_must_split_the_replica_batch():
    with pytest.raises(ConfigError, match="num_microbatches 3"):
        build_plan(make_cfg(stage_num_hidden_layers_list=[3, 1], num_microbatches=3), 2)


def test_virtual_stages_are_checked():
    with pytest.raises(ConfigError, match="needs pipeline_schedule 'interleaved-1f1b'"):
        make_cfg(virtual_stages=2)
    with pytest.raises(ConfigError, match="side-tuning"):
        make_cfg(virtual_stages=2, pipeline_schedule="interleaved-1f1b", use_side=True)
    with pytest.raises(ConfigError, match="must list virtual_stages 2 x the pipeline ranks"):
        build_plan(make_cfg(stage_num_hidden_layers_list=[2, 1, 1], virtual_stages=2,
                            pipeline_schedule="interleaved-1f1b"), 2)
    with pytest.raises(ConfigError, match="multiple of the 2 pipeline ranks"):
        build_plan(make_cfg(stage_num_hidden_layers_list=[1, 1, 1, 1], virtual_stages=2, num_microbatches=1,
                            pipeline_schedule="interleaved-1f1b"), 2)
    plan = build_plan(make_cfg(**INTERLEAVED, stage_num_hidden_layers_list=[2, 1, 3, 1], virtual_stages=2,
                               num_microbatches=2, pipeline_schedule="interleaved-1f1b"), 2)
    assert (plan.pp_size, plan.virtual_stages) == (2, 2)
    assert [ParallelContext(plan, rank).layers for rank in (0, 1)] == [[0, 1, 3, 4, 5], [2, 6]]
