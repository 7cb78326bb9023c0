"""LLaMA under pipeline parallelism equals serial LLaMA: both losses of 2 optimizer steps and
every gradient, for GPipe, 1F1B and ZB-H1, uneven stages ([3, 1] at world 2, [2, 1, 1] at world 3),
4 micro-batches per accumulation step, untied and tied (a last-stage copy of the embeddings)
LM heads. One spawn per world runs every variant. Interleaved 1F1B: two chunks of layers per rank."""
import pytest

from galaxy.plan import build_plan
from galaxy.train.config import load_config
from tests.helpers import run_ranks
from tests.models.llama.common import MODEL, assert_matches_serial, train_two_steps

SCHEDULES = ["gpipe", "1f1b", "zb-h1"]
TIES = [False, True]
STAGES = {2: [3, 1], 3: [2, 1, 1]}
CHUNKED = {2: [3, 1, 2, 1], 3: [2, 1, 1, 1, 1, 1]}  # chunk c of rank r: model stage c x world + r
INTERLEAVED = dict(num_hidden_layers=7, batch_size=6, num_microbatches=3)  # 6 micro-batches per step


def config(tie, stages=None, **overrides):
    """learning_rate 1e-4: Adam's first step moves a weight by ~lr whatever its gradient's size, so
    step 1's fp32 rounding (2e-7) shows in step 2's gradients in proportion to lr: serial against
    serial with another accumulation split differs by 1.2e-5 at the default 5e-4, 2.5e-6 at 1e-4
    (tied head). In fp64 the pipeline matched serial to < 1e-15."""
    pipeline = dict(stage_num_hidden_layers_list=stages, num_microbatches=4) if stages else {}
    return load_config(None, {**MODEL, "num_hidden_layers": 4, "seq_length": 16, "batch_size": 8,
                              "learning_rate": 1e-4, "tie_word_embeddings": tie, **pipeline, **overrides})


def _pipelines(rank, world):
    out = {}
    for schedule in SCHEDULES:
        for tie in TIES:
            cfg = {**config(tie, STAGES[world]), "pipeline_schedule": schedule}
            out[schedule, tie] = train_two_steps(cfg, build_plan(cfg, world), rank)
    return out


@pytest.fixture(scope="module")
def serial():
    return {tie: train_two_steps(config(tie), build_plan(config(tie), 1), 0) for tie in TIES}


@pytest.mark.parametrize("world", [2, 3])
def test_pipeline_matches_serial(world, serial):
    results = run_ranks(_pipelines, world, timeout_s=240)
    for (schedule, tie), _ in results[0].items():
        per_stage = [out[schedule, tie] for out in results]
        for rank, result in enumerate(per_stage):
            assert_matches_serial(result, serial[tie], (schedule, f"tie={tie}", rank))
        # the stages hold every serial parameter between them (a tied head only as the embeddings)
        names = [set(grads) for _, grads in per_stage]
        assert set().union(*names) == set(serial[tie][1]), (schedule, tie)
        assert sum(map(len, names)) == len(serial[tie][1]), (schedule, tie)


def _interleaved(rank, world):
    cfg = config(True, CHUNKED[world], **INTERLEAVED, virtual_stages=2, pipeline_schedule="interleaved-1f1b")
    return train_two_steps(cfg, build_plan(cfg, world), rank)


@pytest.mark.parametrize("world", [2, 3])
def test_interleaved_matches_serial(world):
    """Uneven chunks, the tied head's copy on the last rank's second chunk."""
    serial = train_two_steps(config(True, **INTERLEAVED), build_plan(config(True, **INTERLEAVED), 1), 0)
    results = run_ranks(_interleaved, world, timeout_s=240)
    for rank, result in enumerate(results):
        assert_matches_serial(result, serial, ("interleaved-1f1b", rank))
    assert set().union(*(set(grads) for _, grads in results)) == set(serial[1])
