"""ZeRO stages 1-3 equal plain data parallelism and serial training (losses and parameters after
3 steps, fp32, uneven shards, with gradient accumulation at world 2 and 3, with TP and PP),
checkpoints move between stages, bad ZeRO configs stop with the key named, and ZeRO-3 holds its
shard fraction of plain DP's model state per rank (an even split at world 2: 50%)."""
import pytest
import torch

from galaxy.comm.context import ParallelContext
from galaxy.config.load import load_config
from galaxy.data import SyntheticMLM
from galaxy.errors import ConfigError
from galaxy.layers.param_spec import GradSum, spec_of
from galaxy.models.bert import BertConfig, BertForMaskedLM
from galaxy.pipeline import PipelineForwardBackward
from galaxy.plan import build_plan
from galaxy.train import checkpoint
from galaxy.train.loop import Trainer
from galaxy.train.zero import check_zero, model_state_bytes, shard_fractions, shard_sizes
from tests.helpers import rel_err, run_ranks

TOL = 1e-5
STEPS = 3
SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=4, vocab_size=64,
             seq_length=16, max_position_embeddings=32, batch_size=12, hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0, data="synthetic", warmup_steps=1, learning_rate=1e-2,
             weight_decay=0.1, max_grad_norm=0.5, seed=5)


def make_trainer(cfg, rank, world):
    ctx = ParallelContext.create(build_plan(cfg, world), rank)
    torch.manual_seed(cfg["seed"])
    model = BertForMaskedLM(BertConfig.from_dict(cfg), ctx)
    trainer = Trainer(model, ctx, cfg, SyntheticMLM(cfg["vocab_size"], cfg["seq_length"], cfg["seed"]), 2 * STEPS,
                      log=lambda *_: None)
    if ctx.plan.pp_size > 1:
        trainer.forward_backward = PipelineForwardBackward(trainer)
    return trainer


def train(trainer, until):
    return [trainer.train_step()["loss"] for _ in range(until - trainer.step)]


def weights(trainer):
    with trainer.full_weights():
        return {spec_of(p).init_name if spec_of(p).grad_sum is GradSum.TIED else n: p.detach().clone()
                for n, p in trainer.model.named_parameters()}


def every_stage(rank, world, overrides):
    """{stage: (losses, weights, model-state bytes)} of this rank, plain DP as stage 0."""
    out = {}
    for stage in (0, 1, 2, 3):
        trainer = make_trainer(load_config(None, {**SMALL, **overrides, "zero_stage": stage}), rank, world)
        out[stage] = (train(trainer, STEPS), weights(trainer), model_state_bytes(trainer))
    return out


def assert_same(results, reference_losses, reference_weights=None):
    """Every stage's losses equal the reference's, its weights plain DP's tensor by tensor, and plain
    DP's weights the reference's over the whole model: after a few AdamW steps one tensor may differ
    more, as Adam scales an element's step by its gradient's size, so an element whose gradient is
    small takes summation-order noise as a full step (v.bias at world 2 with 3 micro-steps: 1.6e-5)."""
    for rank_results in results:
        dp_weights = rank_results[0][1]
        for stage, (losses, got, _) in rank_results.items():
            for a, b in zip(losses, reference_losses, strict=True):
                assert abs(a - b) <= TOL * abs(b), (stage, losses, reference_losses)
            assert_weights_close(got, dp_weights)
        if reference_weights is not None:
            names = [n for n in reference_weights if not n.endswith(".k.bias")]
            whole = [torch.cat([w[n].flatten() for n in names]) for w in (dp_weights, reference_weights)]
            assert rel_err(*whole) < TOL, rel_err(*whole)


def assert_weights_close(got, want):
    for name, w in want.items():
        if name.endswith(".k.bias"):  # gradient analytically 0: Adam turns rounding noise into steps
            continue
        assert rel_err(got[name], w) < TOL, (name, rel_err(got[name], w))


def serial(**overrides):
    trainer = make_trainer(load_config(None, {**SMALL, **overrides}), 0, 1)
    return train(trainer, STEPS), weights(trainer)


# (world 2 without accumulation: test_memory_proportional_shards_equal_serial; 3 micro-steps: a
# middle one that neither starts nor ends the accumulation)
@pytest.mark.parametrize("world,fractions,accumulate", [(2, [0.7, 0.3], 3), (3, [0.5, 0.3, 0.2], 2)])
def test_every_stage_equals_dp_and_serial(world, fractions, accumulate):
    results = run_ranks(every_stage, world, {"data_parallel_size": world, "zero_shard_list": fractions,
                                             "gradient_accumulation_steps": accumulate})
    losses, reference = serial(gradient_accumulation_steps=accumulate)
    assert_same(results, losses, reference)
    for rank, rank_results in enumerate(results):  # ZeRO-3 holds its fraction of plain DP's model state
        plain, zero3 = (sum(rank_results[s][2].values()) for s in (0, 3))  # (at world 2, even: <= 55%)
        assert zero3 <= (fractions[rank] + 0.01) * plain, (rank, zero3, plain)


@pytest.mark.parametrize("layout", ["tp", "galaxy"])
def test_every_stage_with_tensor_parallel(layout):  # world 4 = 2 uneven tensor ranks x 2 replicas
    results = run_ranks(every_stage, 4, {"parallel": layout, "tp_num_attention_heads_list": [3, 1],
                                         "tp_intermediate_size_list": [40, 24], "seq_scatter_list": [10, 6],
                                         "data_parallel_size": 2, "zero_shard_list": [0.6, 0.4]})
    assert_same(results, serial()[0])


def test_every_stage_with_pipeline():  # world 4 = 2 uneven stages x 2 replicas
    results = run_ranks(every_stage, 4, {"stage_num_hidden_layers_list": [1, 3], "num_microbatches": 2,
                                         "data_parallel_size": 2, "zero_shard_list": [0.4, 0.6]})
    assert_same(results, serial()[0])


def resume_across(rank, world, save_dir, first, second):
    """6 steps under zero_stage `first`; 3 under `first` + save + resume under `second` + 3."""
    cfg = {**SMALL, "data_parallel_size": world, "zero_shard_list": [0.7, 0.3]}
    straight = make_trainer(load_config(None, {**cfg, "zero_stage": first}), rank, world)
    straight_losses = train(straight, 2 * STEPS)
    head = make_trainer(load_config(None, {**cfg, "zero_stage": first}), rank, world)
    losses = train(head, STEPS)
    checkpoint.save(head, save_dir)
    tail = make_trainer(load_config(None, {**cfg, "zero_stage": second}), rank, world)
    checkpoint.resume(tail, save_dir)
    losses += train(tail, 2 * STEPS)
    return straight_losses, losses, weights(straight), weights(tail)


@pytest.mark.parametrize("first,second", [(2, 1), (2, 0), (0, 2), (1, 3), (3, 0)])
def test_checkpoint_resumes_across_stages(tmp_path, first, second):
    for straight, resumed, want, got in run_ranks(resume_across, 2, str(tmp_path), first, second):
        for a, b in zip(resumed, straight, strict=True):
            assert abs(a - b) <= TOL * abs(b), (resumed, straight)
        assert_weights_close(got, want)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="zero_shard_list.*sums to"):
        load_config(None, {**SMALL, "zero_stage": 1, "zero_shard_list": [0.5, 0.4]})
    with pytest.raises(ConfigError, match="zero_stage"):
        load_config(None, {**SMALL, "zero_stage": 4})
    cfg = load_config(None, {**SMALL, "zero_stage": 2, "zero_shard_list": [0.5, 0.3, 0.2]})
    with pytest.raises(ConfigError, match="zero_shard_list.*3 entries for 2"):
        check_zero(cfg, build_plan(cfg, 2))
    cfg = load_config(None, {**SMALL, "zero_stage": 1, "parallel": "tp"})
    with pytest.raises(ConfigError, match="zero_stage.*no data-parallel group"):
        check_zero(cfg, build_plan(cfg, 2))
    with pytest.raises(ConfigError, match="'zero_shard_list' and 'memory_mb' both"):
        load_config(None, {**SMALL, "zero_stage": 1, "zero_shard_list": [0.5, 0.5], "memory_mb": [2, 1]})
    with pytest.raises(ConfigError, match="memory_mb.*positive"):
        load_config(None, {**SMALL, "zero_stage": 1, "memory_mb": [2, 0]})
    cfg = load_config(None, {**SMALL, "zero_stage": 1, "memory_mb": [4000, 2000, 2000]})
    with pytest.raises(ConfigError, match="memory_mb.*3 entries for 2"):
        check_zero(cfg, build_plan(cfg, 2))


def test_shards_follow_memory_mb_unless_fractions_are_given():
    by_memory = load_config(None, {**SMALL, "zero_stage": 1, "memory_mb": [3000, 1000]})
    assert shard_fractions(by_memory, 2) == [0.75, 0.25]
    assert shard_fractions(load_config(None, {**SMALL, "zero_stage": 1}), 4) == [0.25] * 4
    given = load_config(None, {**SMALL, "zero_stage": 1, "zero_shard_list": [0.6, 0.4]})
    assert shard_fractions(given, 2) == [0.6, 0.4]


def test_memory_proportional_shards_equal_serial():  # every stage at world 2, shards 3:1 by memory
    results = run_ranks(every_stage, 2, {"data_parallel_size": 2, "memory_mb": [3000, 1000]})
    losses, reference = serial()
    assert_same(results, losses, reference)
    for rank_results, share in zip(results, (0.75, 0.25), strict=True):  # ZeRO-3 holds the rank's share of the state
        plain, zero3 = (sum(rank_results[s][2].values()) for s in (0, 3))
        assert zero3 <= (share + 0.01) * plain, (share, zero3, plain)


def test_shard_sizes_follow_fractions():
    assert shard_sizes(10, [0.5, 0.3, 0.2]) == [5, 3, 2]
    assert shard_sizes(7, [0.5, 0.5]) == [4, 3] and sum(shard_sizes(1001, [1 / 3] * 3)) == 1001
