"""galaxy/train/grad_sync.py: the bucketed sum over replicas equals the gradients' sum, and a misuse
(arming twice in one step) is an error, not a crash or a hang of the other ranks."""
import torch

from galaxy.comm.context import ParallelContext
from galaxy.config.load import load_config
from galaxy.models.registry import build_model
from galaxy.plan import build_plan
from galaxy.train.grad_sync import GradSync
from tests.helpers import run_ranks

CFG = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_hidden_layers=1, vocab_size=64,
           seq_length=8, max_position_embeddings=16, batch_size=2, parallel="dp")


def _step(rank, world, arm_twice):
    ctx = ParallelContext.create(build_plan(load_config(None, CFG), world), rank)
    model = build_model(load_config(None, CFG), ctx)
    model(input_ids=_ids(0), labels=_ids(0))[0].backward()  # before the sync exists: local sums
    model(input_ids=_ids(1), labels=_ids(1))[0].backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}  # both replicas' samples
    model.zero_grad(set_to_none=True)
    sync = GradSync(model, ctx, bucket_mb=0.001)  # many buckets: most launch during backward
    ids = _ids(rank)
    sync.arm()
    model(input_ids=ids, labels=ids)[0].backward()
    try:
        if arm_twice:
            sync.arm()
    except RuntimeError as e:
        sync.finish()  # the launched buckets still complete on every rank
        return str(e)
    sync.finish()
    return {n: (p.grad, expected[n]) for n, p in model.named_parameters()}


def _ids(replica):
    return torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(replica))


def test_sum_over_replicas_and_arming_twice_is_an_error():
    for grads in run_ranks(_step, 2, False):  # every replica holds the sum of both replicas' gradients
        for got, expected in grads.values():
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    messages = run_ranks(_step, 2, True)
    assert all("armed again before finish()" in m for m in messages)
