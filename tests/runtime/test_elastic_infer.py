"""--elastic inference in place: a rank of a world-3 run is SIGKILLed between requests or within
one; the survivors regroup in their own processes, re-plan for world 2 and keep their own rows of
every weight, receive the rows that change owner from each other, and rebuild only the lost rank's
rows from the run's sources. Every request's output, before and after the loss, equals the serial
model's (rel. error < 1e-5), and the bytes rebuilt are exactly the lost rank's split parameters.

BERT Galaxy (uneven) loads its base weights from load_checkpoint and a LoRA file from
load_trainable (merge_weights: merged into the weights at eval), both different from the seed's
initial values, and loses rank 1 within a request: rank 0 has served that request, while rank 2's
last collective of it failed (as when a lost rank's last message reaches one peer and not
another); the survivors agree on the requests all of them served, rank 0 drops its extra one, and
both serve it again, so each survivor's outputs are every request's, once and in order. BERT SP
with both files loses rank 2 between requests (its layers' weights carry a Shard of all their
rows, yet are whole on every rank: nothing is rebuilt); LLaMA TP with grouped-query attention
starts from the seed's weights and loses rank 0 (whose process hosted nothing: the launcher hosts
the store). A survivor lost while the others re-plan makes them regroup and re-plan again."""
import os
import signal

import pytest
import torch

from galaxy.app import infer
from galaxy.comm.context import ParallelContext
from galaxy.config.load import load_config
from galaxy.models.registry import build_model
from galaxy.plan import build_plan
from galaxy.reshard.relayout import META, _NoDrawOnMeta, part_of
from galaxy.runtime.launch import RankFailed, spawn
from galaxy.tuning.apply import apply_tuning, load_sources
from tests.helpers import rel_err
from tests.models.llama.common import MODEL as LLAMA
from tests.tuning.test_tuning_layouts import offset

ALL_LORA = ["query", "key", "value", "dense", "intermediate", "output"]
BERT = dict(model="bert", hidden_size=32, intermediate_size=48, num_attention_heads=4, num_hidden_layers=2,
            vocab_size=64, seq_length=12, max_position_embeddings=16, hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1, use_lora=True, lora_dim=4, lora_alpha=8.0, lora_targets=ALL_LORA,
            merge_weights=True)
GALAXY = dict(BERT, parallel="galaxy", tp_num_attention_heads_list=[1, 2, 1], tp_intermediate_size_list=[8, 30, 10],
              seq_scatter_list=[5, 4, 3])
CASES = {  # name: (config keys, lost rank, requests served before the loss, lagging survivor)
    # a lagging survivor given: the rank is lost within request `after`, which that survivor has not served
    "bert galaxy, checkpoint + LoRA, lost within a request": (GALAXY, 1, 2, 2),
    # every weight on every rank, though a layer's carry a Shard of all their rows: nothing to rebuild
    "bert sp, checkpoint + LoRA": (dict(BERT, parallel="sp", seq_scatter_list=[5, 4, 3]), 2, 1, None),
    "llama tp, GQA, seed weights": (dict(LLAMA, num_hidden_layers=2, parallel="tp",
                                         tp_num_attention_heads_list=[4, 2, 2], tp_intermediate_size_list=[40, 32, 24]),
                                    0, 1, None),
}
REQUESTS = 4


def sources(root):
    """A base checkpoint and a LoRA file, both away from the seed's values (a fresh lora_B is 0)."""
    cfg = load_config(None, {**BERT, "parallel": "serial"})
    model = build_model(cfg)
    shift(model)
    model.save_hf(f"{root}/base")
    apply_tuning(model, cfg, model.ctx)
    shift(model)
    model.save_hf(f"{root}/lora", trainable_only=True)
    return dict(load_checkpoint=f"{root}/base", load_trainable=f"{root}/lora")


@torch.no_grad()
def shift(model):
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.add_(offset(name, p))


def batches(cfg):
    g = torch.Generator().manual_seed(3)
    return [(torch.randint(4, cfg["vocab_size"], (2, cfg["seq_length"]), generator=g), None) for _ in range(REQUESTS)]


def serial_outputs(cfg):
    cfg = dict(cfg, parallel="serial", tp_num_attention_heads_list=None, tp_intermediate_size_list=None,
               seq_scatter_list=None)
    model = build_model(cfg)
    load_sources(model, cfg, model.ctx)
    forward = infer.forward_fn(model.eval(), cfg["model"])
    with torch.no_grad():
        return [forward(ids, mask) for ids, mask in batches(cfg)]


def lost_rows_bytes(cfg, plan, rank):
    """The bytes of the split parameters (the tuning method's too) that `rank` holds under `plan`."""
    ctx = ParallelContext(plan, rank=rank, device=META)
    with _NoDrawOnMeta():
        model = build_model(cfg, ctx)
        apply_tuning(model, cfg, ctx)
    return sum(p.numel() * p.element_size() for p in model.parameters() if part_of(p))


def _killing(serve, victim, after, world, failure=None):
    """`victim` dies after `after` requests at `world`, or raises `failure` (and lives on) when given."""
    def serve_then_die(forward, batches, ctx, *rest):
        for served, result in enumerate(serve(forward, batches, ctx, *rest), 1):
            yield result
            if (ctx.rank, served, ctx.world) == (victim, after, world):
                if failure:
                    raise failure
                os.kill(os.getpid(), signal.SIGKILL)
    return serve_then_die


def _lost_within(serve, victim, request, world, lagging):
    """`victim` dies within request `request` (counted from 1) at `world`, its collectives done, and
    survivor `lagging`'s last collective of it fails: the other survivors have served the request,
    `lagging` has not."""
    def serve_until_lost(forward, batches, ctx, *rest):
        for served, result in enumerate(serve(forward, batches, ctx, *rest), 1):
            if (served, ctx.world) == (request, world) and ctx.rank == victim:
                os.kill(os.getpid(), signal.SIGKILL)
            if (served, ctx.world) == (request, world) and ctx.rank == lagging:
                raise RuntimeError("gloo: connection closed by peer (the lost rank's last message never came)")
            yield result
    return serve_until_lost


def _dying_in(fill, victim, world):
    def fill_or_die(new, holders, ctx):
        if (ctx.rank, ctx.world) == (victim, world):
            os.kill(os.getpid(), signal.SIGKILL)
        return fill(new, holders, ctx)
    return fill_or_die


def _serve_losing_a_rank(rank, world, cfg, victim, after, lagging=None, regroups=1, replanning_victim=None,
                         failure=None):
    """`lagging`: see _lost_within; `replanning_victim` (rank, world): a survivor that dies too, while
    the survivors re-plan. Returns the outputs served, how many outputs this rank computed (a request
    served twice counts twice), the recoveries and the final plan."""
    # this process's module: the Server calls it
    infer.serve = (_killing(infer.serve, victim, after, world, failure) if lagging is None
                   else _lost_within(infer.serve, victim, after, world, lagging))
    if replanning_victim:
        infer.fill_after_loss = _dying_in(infer.fill_after_loss, *replanning_victim)
    model, ctx = infer.eval_model(cfg, build_plan(cfg, world), rank)
    server = infer.Server(model, ctx, cfg, regroups=regroups)
    computed = []
    outputs = [out for _, out in server.run(batches(cfg), keep=lambda out: computed.append(out) or out)]
    return outputs, len(computed), server.recoveries, server.ctx.plan.describe()


def assert_serial(outputs, want, label):
    assert len(outputs) == REQUESTS
    for i, (got, expected) in enumerate(zip(outputs, want, strict=True)):
        assert rel_err(got, expected) < 1e-5, (label, i, rel_err(got, expected))


@pytest.mark.parametrize("case", CASES)
def test_survivors_keep_their_rows_and_match_serial(case, tmp_path, capfd):
    keys, victim, after, lagging = CASES[case]
    cfg = load_config(None, {**keys, **(sources(tmp_path) if keys["model"] == "bert" else {}), "timeout_s": 30})
    want = serial_outputs(cfg)
    results = spawn(_serve_losing_a_rank, 3, (cfg, victim, after, lagging), timeout_s=30, limit_s=150, regroups=1)
    assert results[victim] is None
    agreed = after - (lagging is not None)  # the lagging survivor had not served request `after`
    assert f"[rank 0] elastic: lost rank(s) [{victim}] during request {agreed}; " in capfd.readouterr().out
    lost = lost_rows_bytes(cfg, build_plan(cfg, 3), victim)
    for rank, result in enumerate(results):
        if rank == victim:
            continue
        outputs, computed, recoveries, plan = result
        assert computed == REQUESTS + (lagging not in (None, rank)), computed  # ahead: one request served twice
        assert "tp=2" in plan, plan
        assert [(r["lost"], r["served"]) for r in recoveries] == [([victim], agreed)]
        assert recoveries[0]["rebuilt"] == lost, (recoveries, lost)
        assert recoveries[0]["kept"] > 2 * lost  # what the survivors held stayed with them
        assert_serial(outputs, want, (case, rank))


def test_a_survivor_lost_while_the_survivors_replan():
    """Rank 1 dies after request 1; rank 2 dies while the survivors re-plan for it. The last
    survivor regroups again (a second of its regroups), re-plans from its rows under the world-3
    plan and rebuilds both lost ranks' rows."""
    cfg = load_config(None, {**GALAXY, "timeout_s": 30})
    want = serial_outputs(cfg)
    results = spawn(_serve_losing_a_rank, 3, (cfg, 1, 1, None, 2, (1, 2)), timeout_s=30, limit_s=150, regroups=2)
    assert results[1] is None and results[2] is None
    outputs, _, recoveries, plan = results[0]
    assert "tp=1" in plan, plan
    plan3 = build_plan(cfg, 3)
    assert recoveries == [dict(recoveries[0], lost=[1, 2], rebuilt=sum(lost_rows_bytes(cfg, plan3, r) for r in (1, 2)))]
    assert_serial(outputs, want, "rank 0")


def test_a_failure_that_no_loss_explains_names_its_rank():
    """Rank 1's collective-like error, with every rank alive: the launcher names no lost rank, so
    every rank gives up after timeout_s (once, not once per regroup left) naming rank 1's error,
    not the closed connections the others saw when it left the group."""
    cfg = load_config(None, {**GALAXY, "timeout_s": 8})
    failure = RuntimeError("gloo: a collective went wrong, yet no rank died")
    with pytest.raises(RankFailed, match="no rank was lost within 8s; the first failure: rank 1: gloo: a collective"):
        spawn(_serve_losing_a_rank, 3, (cfg, 1, 1, None, 3, None, failure), timeout_s=8, limit_s=60, regroups=3)
