"""Pipeline stages whose layers run in the Galaxy layout (world 4 = 2 stages x 2 tensor ranks,
uneven heads, columns and positions) train exactly like the serial model."""
from galaxy.comm.context import ParallelContext
from galaxy.data import SyntheticMLM
from galaxy.models.bert import BertConfig, BertForMaskedLM
from galaxy.models.bert.model import mlm_to_hf
from galaxy.models.checkpoint import gather_full_state
from galaxy.pipeline import PipelineForwardBackward
from galaxy.plan import build_plan
from galaxy.train.loop import Trainer
from tests.helpers import rel_err, run_ranks
from tests.pipeline.test_pipeline_vs_serial import make_cfg

GALAXY_STAGES = dict(parallel="galaxy", stage_num_hidden_layers_list=[3, 1], num_microbatches=2,
                     tp_num_attention_heads_list=[3, 1], tp_intermediate_size_list=[40, 24], seq_scatter_list=[10, 6])


def losses_and_grads(rank, world, cfg):
    """Losses of 2 optimizer steps and this stage's full (tensor-gathered) gradients of the second."""
    plan = build_plan(cfg, world)
    ctx = ParallelContext.create(plan, rank)
    model = BertForMaskedLM(BertConfig.from_dict(cfg), ctx)
    trainer = Trainer(model, ctx, cfg, SyntheticMLM(cfg["vocab_size"], cfg["seq_length"], cfg["seed"]), 2,
                      log=lambda *_: None)
    if plan.pp_size > 1:
        trainer.forward_backward = PipelineForwardBackward(trainer)
    grads = {}
    trainer.before_update = lambda: grads.update(gather_full_state(model, ctx, mlm_to_hf, lambda p: p.grad))
    return [trainer.train_step()["loss"] for _ in range(2)], grads


def test_galaxy_inside_pipeline_stages_equals_serial():
    want_losses, want_grads = losses_and_grads(0, 1, make_cfg())
    results = run_ranks(losses_and_grads, 4, make_cfg(**GALAXY_STAGES), timeout_s=240)
    for losses, grads in results:
        assert all(abs(a - b) / abs(b) < 1e-5 for a, b in zip(losses, want_losses, strict=True)), (losses, want_losses)
        for name, g in grads.items():
            assert rel_err(g, want_grads[name]) < 1e-5, (name, rel_err(g, want_grads[name]))
    assert set().union(*(grads for _, grads in results)) == set(want_grads)  # the stages hold every tensor
