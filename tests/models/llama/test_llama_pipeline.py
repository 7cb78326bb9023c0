"""LLaMA under pipeline parallelism equals serial LLaMA: both losses of 2 optimizer steps and
every gradient, for GPipe and 1F1B, uneven stages ([3, 1] at world 2, [2, 1, 1] at world 3),
4 micro-batches per accumulation step, untied and tied (a last-stage copy of the embeddings)
LM heads. One spawn per world runs every variant. Then ZB-H1 and interleaved 1F1B (two chunks of
layers per rank), tied, against one serial run of 7 layers."""
import pytest

from galaxy.config.load import load_config
from galaxy.plan import build_plan
from tests.helpers import run_ranks
from tests.models.llama.common import MODEL, assert_matches_serial, train_two_steps

SCHEDULES = ["gpipe", "1f1b"]
TIES = [False, True]
STAGES = {2: [3, 1], 3: [2, 1, 1]}
SEVEN = dict(num_hidden_layers=7, batch_size=6, num_microbatches=3)  # 6 micro-batches per step
SPLIT = {"zb-h1": {2: [4, 3], 3: [3, 2, 2]},
         "interleaved-1f1b": {2: [3, 1, 2, 1], 3: [2, 1, 1, 1, 1, 1]}}  # chunk c of rank r: stage c x world + r


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
            cfg = config(tie, STAGES[world], pipeline_schedule=schedule)
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


def _split_and_interleaved(rank, world):
    out = {}
    for schedule, stages in SPLIT.items():
        chunks = len(stages[world]) // world
        cfg = config(True, stages[world], **SEVEN, virtual_stages=chunks, pipeline_schedule=schedule)
        out[schedule] = train_two_steps(cfg, build_plan(cfg, world), rank)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_split_and_interleaved_match_serial(world, serial7):
    """ZB-H1 (B and W apart) and interleaved 1F1B (uneven chunks, the tied head's copy on the last
    rank's second chunk)."""
    results = run_ranks(_split_and_interleaved, world, timeout_s=240)
    for schedule in SPLIT:
        for rank, result in enumerate(results):
            assert_matches_serial(result[schedule], serial7, (schedule, rank))
        assert set().union(*(set(r[schedule][1]) for r in results)) == set(serial7[1]), schedule


@pytest.fixture(scope="module")
def serial7():
    return train_two_steps(config(True, **SEVEN), build_plan(config(True, **SEVEN), 1), 0)
