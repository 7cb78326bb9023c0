"""What a plan moves, read from a recorded run of the real model (pretrain_galaxy.py --explain).

For every rank its real model, with its tuning method, is built on the meta device under a
context whose groups record instead of sending (ParallelContext.recording), and one real
optimizer step runs on it: forward and backward of every micro-step (under pipeline parallelism
the schedule's actions, with their sends), the gradient sync and AdamW (ZeRO's parameter gathers).
Meta tensors have shapes and no values, so nothing is computed and no process starts. Every
collective reports itself through galaxy.comm.stats exactly as in a traced run, with the bytes
this rank contributes (all-gather: its own slice; reduce-scatter and all-reduce: its whole input)
and its phase, so the explanation cannot drift from the model. Each is labelled with the layer
whose forward or backward runs it.
"""
import inspect
import warnings
from collections import Counter, namedtuple
from itertools import groupby

import torch
from torch import nn

from galaxy.comm import stats
from galaxy.comm.context import ParallelContext
from galaxy.pipeline import PipelineForwardBackward, format_actions
from galaxy.plan import Method
from galaxy.train.loop import Trainer
from galaxy.tuning.apply import apply_tuning


# one collective or send: the layer (module name) whose forward or backward runs it ("" outside any),
# the block boundary inside it (stats.site labels, forward only), kind, phase, the tensor's shape, bytes
Move = namedtuple("Move", "layer site kind phase shape nbytes")


def batch(trainer):
    """One micro-step's batch (all zeros) on the trainer's device, with the id tensors its model's forward takes."""
    rows = (trainer.cfg["batch_size"] // trainer.ctx.plan.dp_size, trainer.cfg["seq_length"])
    wanted = ("input_ids", "decoder_input_ids", "labels")  # no attention_mask: all positions are real
    params = inspect.signature(trainer.model.forward).parameters
    return {k: torch.zeros(rows, dtype=torch.long, device=trainer.ctx.device) for k in wanted if k in params}


class _LayerLabels:
    """Which layer (a ModuleList/ModuleDict entry, by module name) runs now: in forward the one
    entered and not left, in backward the last whose backward began (none before a new pass)."""

    def __init__(self, model):
        self.forward, self.backward = [""], ""
        model.register_forward_pre_hook(lambda *_: setattr(self, "backward", ""))
        for parent_name, parent in model.named_modules():
            for key, layer in parent.named_children() if isinstance(parent, (nn.ModuleList, nn.ModuleDict)) else ():
                name = f"{parent_name}.{key}"  # every hook returns None: inputs and outputs stay as they are
                # first of the layer's hooks: ZeRO-3's gathers of its weights (hooks too) belong to it
                layer.register_forward_pre_hook(lambda *_, n=name: self.forward.append(n), prepend=True)
                layer.register_forward_hook(lambda *_: self.forward.pop() and None)
                layer.register_full_backward_pre_hook(lambda *_, n=name: setattr(self, "backward", n), prepend=True)

    def now(self, phase):
        if phase != stats.current_phase():  # sends, gradient sync and the step run outside autograd's passes
            return ""
        return self.forward[-1] if phase == stats.FWD else self.backward


def build_trainer(ctx, cfg, build_model):
    """Rank ctx.rank's real model, with its tuning method, in a Trainer (and its pipeline schedule)
    on ctx's device: the meta device under ParallelContext.recording (also galaxy.profiler.memory)."""
    with torch.device(ctx.device):
        model = build_model(cfg, ctx)
        apply_tuning(model, cfg, ctx)
        trainer = Trainer(model, ctx, cfg, None, 1, log=lambda msg: None)
    if ctx.plan.pp_size > 1:
        trainer.forward_backward = PipelineForwardBackward(trainer)
    return trainer


def run_step(trainer, batches):
    """One optimizer step: forward/backward of every micro-step, the gradient sync, AdamW (ZeRO-1/2
    gather the updated parameter shards). What is recorded here, and galaxy.profiler.memory's memory path."""
    trainer.model.train()
    trainer.forward_backward(batches, 1.0)
    trainer.sync.finish()
    trainer.opt.step()
    trainer.opt.zero_grad(set_to_none=True)


def record_step(plan, cfg, rank, build_model):
    """(moves of one optimizer step on `rank`, in order; the pipeline actions, or None)."""
    trainer = build_trainer(ParallelContext.recording(plan, rank), cfg, build_model)
    actions = (trainer.forward_backward.actions(cfg["gradient_accumulation_steps"] * cfg["num_microbatches"])
               if plan.pp_size > 1 else None)
    moves, labels = [], _LayerLabels(trainer.model)

    def listen(kind, nbytes, phase, start_s, dur_s, shape, site):
        moves.append(Move(labels.now(phase), site, kind, phase, shape, nbytes))

    with stats.listening(listen), warnings.catch_warnings():
        # a frozen layer (side-tuning) gets no input gradient; its label hook still fires, as wanted
        warnings.filterwarnings("ignore", "Full backward hook is firing")
        run_step(trainer, [batch(trainer) for _ in range(cfg["gradient_accumulation_steps"])])
    return moves, actions


def bytes_by_label(moves):
    """{"all_gather": n, "reduce_scatter(bwd)": n, ...}: the names traces use."""
    out = Counter()
    for m in moves:
        out[stats.label(m.kind, m.phase)] += m.nbytes
    return dict(out)


# ----------------------------------------------------------------------------- text

PASSES = {stats.FWD: "forward", stats.BWD: "backward (conjugates, in reverse order)", stats.GRAD: "gradient sync",
          stats.STEP: "optimizer step"}

def _span(r):
    """'0-1,3-5': runs of consecutive indices (a pipeline rank's chunks of layers lie apart)."""
    starts = [i for i in r if i - 1 not in r]
    return ",".join(f"{i}-{next(j for j in r if j >= i and j + 1 not in r)}" for i in starts) or "-"


def _mib(n):
    return f"{n / 2**20:.2f} MiB"


def ownership(plan):
    """Which slice of each split dimension every rank owns ("all" where it is not split)."""
    split = {"heads": plan.att is Method.TP, "kv_heads": plan.att is Method.TP, "columns": plan.mlp is Method.TP,
             "positions": plan.seq_sharded, "layers": True}
    lines = [f"{'rank':>4} {'tp':>3} {'dp':>3} {'pp':>3} " + " ".join(f"{k:>10}" for k in split)]
    for rank in range(plan.world):
        c = ParallelContext(plan, rank)
        cells = [_span(getattr(c, k)) if is_split else "all" for k, is_split in split.items()]
        lines.append(f"{rank:>4} {c.tp_rank:>3} {c.dp_rank:>3} {c.pp_rank:>3} " + " ".join(f"{v:>10}" for v in cells))
    return lines


def _move_lines(moves):
    """Consecutive moves of one layer and phase under one heading, runs of equal rows counted."""
    lines = []
    for (layer, phase), section in groupby(moves, key=lambda m: (m.layer, m.phase)):
        lines.append(f"  {layer or '(outside any layer)'}: {PASSES[phase]}")
        for (site, kind, shape, nbytes), run in groupby((m.site, m.kind, m.shape, m.nbytes) for m in section):
            count = len(list(run))
            times = f"x{count}" if count > 1 else ""
            lines.append(f"    {site:<30} {stats.label(kind, phase):<20} {str(list(shape)):<18} {times:>3} "
                         f"{_mib(nbytes * count):>10}")
    return lines


def explain(plan, cfg, build_model):
    """The plan as text: ownership, each rank's collectives of one recorded step, byte totals,
    and under pipeline parallelism each stage's schedule."""
    lines = [f"plan for world {plan.world}: {plan.describe()}",
             f"batch {cfg['batch_size']} x seq {cfg['seq_length']} x hidden {cfg['hidden_size']}, "
             f"{cfg['gradient_accumulation_steps']} micro-step(s) per optimizer step", "", "ownership:"]
    lines += ownership(plan)
    totals, schedule = {}, []
    for rank in range(plan.world):
        moves, actions = record_step(plan, cfg, rank, build_model)
        totals[rank] = bytes_by_label(moves)
        if actions is not None and rank % (plan.tp_size * plan.dp_size) == 0:
            schedule.append(f"  stage {rank // (plan.tp_size * plan.dp_size)}: {format_actions(actions)}")
        lines += ["", f"rank {rank}: what it sends in one optimizer step, in order (bytes this rank contributes)"]
        lines += _move_lines(moves) if moves else ["  nothing"]
    kinds = sorted({k for t in totals.values() for k in t})
    lines += ["", "bytes per optimizer step, per rank:",
              f"{'rank':>4} " + " ".join(f"{k:>20}" for k in kinds) + f" {'total':>12}"]
    lines += [f"{rank:>4} " + " ".join(f"{_mib(t.get(k, 0)):>20}" for k in kinds) + f" {_mib(sum(t.values())):>12}"
              for rank, t in totals.items()]
    if schedule:
        lines += ["", f"pipeline schedule {cfg['pipeline_schedule']}, actions per stage:"] + schedule
    return "\n".join(lines)
