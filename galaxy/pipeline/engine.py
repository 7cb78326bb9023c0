"""One optimizer step of a pipeline stage: micro-batches through the schedule, then the
gradient sums the pipeline adds to data parallelism (tied weights held on two stages).

The model only needs the stage interface BertForMaskedLM has:
  * `model.ctx` (the ParallelContext) and `model.config.hidden_size`;
  * `model(**batch, hidden_states=h)`: the first stage ignores h and embeds the batch;
    a middle stage returns hidden states [micro_batch, seq, hidden]; the last stage
    returns (loss_sum, n_label_tokens) from the batch's labels;
  * with virtual stages (interleaved 1F1B), `model(..., chunk=c)` runs the rank's chunk c only:
    it embeds at chunk 0 of the first rank and returns the loss at the last chunk of the last;
  * optionally `model.pipeline_streams`: ((width, carries_grad), ...) when a stage hands on
    more than its hidden states (side-tuning adds the side network's state). A stage then
    returns, and is given as h, a tuple of [micro_batch, seq, width] tensors, and only the
    streams that carry a gradient send one back;
  * a weight the last stage shares with the first (tied embeddings) is a separate
    parameter there whose ParamSpec has grad_sum GradSum.TIED and init_name the first stage's name.
Every stage holds every micro-batch (attention masks are needed everywhere; building a
batch is cheap), so receive shapes follow from the batch and no metadata is sent.
"""
import torch
import torch.distributed as dist

from galaxy.comm.collectives import RecordingGroup
from galaxy.comm.context import new_groups
from galaxy.layers.param_spec import GradSum, spec_of
from galaxy.pipeline.p2p import StageLinks
from galaxy.pipeline.schedule import BACKWARD, FORWARD, WEIGHT, run_schedule, schedule_actions
from galaxy.pipeline.split_backward import backward_input


def split_rows(rows, n):
    """A range of samples -> n equal consecutive ranges."""
    if len(rows) % n:
        raise ValueError(f"a batch of {len(rows)} samples does not split into num_microbatches {n}")
    per = len(rows) // n
    return [rows[i * per:(i + 1) * per] for i in range(n)]


def split_batch(batch, n):
    """A batch dict -> n micro-batch dicts along the sample dimension."""
    parts = split_rows(range(len(next(iter(batch.values())))), n)
    return [{k: v[r.start:r.stop] for k, v in batch.items()} for r in parts]


def pipeline_streams(model, hidden_size):
    """((width, carries_grad), ...) a stage hands on: its hidden states, unless the model says more."""
    return getattr(model, "pipeline_streams", ((hidden_size, True),))


class TiedCopies:
    """Weights held by both the first and the last stage (tied input/output embeddings).
    Each copy only sees its own stage's gradient; summing the two gives the serial gradient,
    so both copies take the same optimizer step and stay equal. Collective to construct."""

    def __init__(self, model, ctx):
        copies = {spec_of(p).init_name: p for p in model.parameters() if spec_of(p).grad_sum is GradSum.TIED}
        if isinstance(ctx.pp_group, RecordingGroup):  # --explain: this sum is not one of the reported collectives
            self.params, self.group = [], None
            return
        per_stage = [None] * ctx.plan.pp_size
        dist.all_gather_object(per_stage, sorted(copies), group=ctx.pp_group)
        names = per_stage[-1]  # the last stage holds the copies
        own = dict(model.named_parameters())
        if ctx.is_first_stage:
            marked = sorted(n for n, p in own.items() if spec_of(p).has_tied_copy)  # what ZeRO leaves whole
            if marked != names:
                raise ValueError(f"last stage copies {names}; the first stage marks {marked} (ParamSpec.has_tied_copy)")
            self.params = [own[n] for n in names]
        else:
            self.params = [copies[n] for n in names] if ctx.is_last_stage else []
        self.params = [p for p in self.params if p.requires_grad]
        self.group = _first_last_group(ctx) if names else None

    def all_reduce(self):
        if self.group is None or not self.params:
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in self.params])
        dist.all_reduce(flat, group=self.group)
        for p, summed in zip(self.params, flat.split([p.numel() for p in self.params]), strict=True):
            p.grad.copy_(summed.view_as(p.grad))


def _first_last_group(ctx):
    """The group {first stage, last stage} of this rank's pipeline (every rank creates every pair)."""
    if ctx.plan.pp_size == 2:
        return ctx.pp_group
    stride = ctx.plan.tp_size * ctx.plan.dp_size
    return new_groups(ctx.rank, [[base, base + (ctx.plan.pp_size - 1) * stride] for base in range(stride)])


class PipelineForwardBackward:
    """Trainer.forward_backward for a pipeline stage:  trainer.forward_backward = PipelineForwardBackward(trainer).

    It needs the trainer's GradSync (the tied-weight sum must follow the data-parallel
    reduction) and step counter (dropout seeds), hence built from the trainer. The batches of
    all accumulation steps are split into `num_microbatches` each and run as one schedule.
    `stats` holds the last schedule run's ScheduleStats (peak live micro-batches)."""

    def __init__(self, trainer):
        self.trainer, self.model, self.ctx = trainer, trainer.model, trainer.ctx
        self.num_microbatches = trainer.cfg["num_microbatches"]
        self.schedule = trainer.cfg["pipeline_schedule"]
        self.chunks = self.ctx.plan.virtual_stages
        self.streams = pipeline_streams(self.model, self.model.config.hidden_size)
        self.dtype = next(self.model.parameters()).dtype  # activations travel in the weights' dtype
        self.links = StageLinks(self.ctx)
        self.tied = TiedCopies(self.model, self.ctx)
        self.weight_work = {}  # (micro-batch, chunk) -> W, the weights' part of its backward (split_backward)
        self.stats = None

    def actions(self, num_microbatches):
        return schedule_actions(self.schedule, self.ctx.plan.pp_size, self.ctx.pp_rank, num_microbatches, self.chunks)

    def _first(self, action):
        """Whether the action's chunk is the model's first stage (it embeds, receives nothing)."""
        return self.ctx.is_first_stage and action.chunk == 0

    def _last(self, action):
        """Whether the action's chunk is the model's last stage (it computes the loss)."""
        return self.ctx.is_last_stage and action.chunk == self.chunks - 1

    def __call__(self, batches, n_tokens):
        self.micro = [m for b in batches for m in split_batch(b, self.num_microbatches)]
        self.rows = [r for a in range(len(batches)) for r in split_rows(self.trainer.rows(a), self.num_microbatches)]
        self.n_tokens, self.loss_sum = n_tokens, 0.0
        actions = self.actions(len(self.micro))
        self.last_grads = [a for a in actions if a.kind in (BACKWARD, WEIGHT)][-1]  # the weights' last
        self.split = any(a.kind == WEIGHT for a in actions)
        self.upcoming = iter(actions)
        self._post_next_recv()  # the first action's; each action then posts the one after it
        self.stats = run_schedule(actions, self._forward, self._backward, self._weights)
        self.links.finish()
        self.trainer.sync.finish()  # data-parallel sums first, then the tied copies' sum
        self.tied.all_reduce()
        return self.loss_sum

    def _stream_shapes(self, i, with_grad_only=False):
        """[micro_batch, seq, width] of the streams micro-batch i hands on (or sends gradients of)."""
        rows = tuple(self.micro[i]["input_ids"].shape)
        return [rows + (width,) for width, carries_grad in self.streams if carries_grad or not with_grad_only]

    def _post_next_recv(self):
        """Post the receive of this stage's next action before the current one computes: its
        message may arrive meanwhile, and a receive posted late stalls the link (galaxy.pipeline.p2p)."""
        a = next(self.upcoming, None)
        if a and a.kind == FORWARD and not self._first(a):
            self.links.post_recv_forward(self._stream_shapes(a.microbatch), self.dtype)
        elif a and a.kind == BACKWARD and not self._last(a):
            self.links.post_recv_backward(self._stream_shapes(a.microbatch, with_grad_only=True), self.dtype)

    def _forward(self, action):
        i = action.microbatch
        batch, received, x = self.micro[i], [], None
        self._post_next_recv()
        self.trainer.key_dropout(self.rows[i])
        if not self._first(action):
            received = self.links.recv_forward(self._stream_shapes(i), self.dtype)
            for r, (_, carries_grad) in zip(received, self.streams, strict=True):
                r.requires_grad_(carries_grad)
            x = received[0] if len(received) == 1 else tuple(received)
        with self.trainer.autocast:
            out = self.model(**batch, hidden_states=x, **({"chunk": action.chunk} if self.chunks > 1 else {}))
        if self._last(action):
            loss_sum, _ = out
            self.loss_sum += loss_sum.detach().double()
            return loss_sum / self.n_tokens, received
        outs = out if isinstance(out, tuple) else (out,)
        self.links.send_forward([o.to(self.dtype) for o in outs])
        return outs, received

    def _with_grad(self, tensors):
        """Those of a stage's streams (its outputs, or what it received: nothing on the first stage)
        that carry a gradient."""
        return [t for t, (_, carries) in zip(tensors, self.streams, strict=True) if carries] if tensors else []

    def _start_backward(self, action):
        self._post_next_recv()
        if action == self.last_grads:
            self.trainer.sync.arm()  # reduce gradients during the last backward only
        # recomputed (checkpointed) layers redraw this micro-batch's masks
        self.trainer.key_dropout(self.rows[action.microbatch])

    def _backward(self, action, saved):
        """The whole backward, or under a split schedule (a W follows) only the stage input's
        gradient: what the weights' gradients need is kept for `_weights`."""
        out, received = saved
        self._start_backward(action)
        outs, grads = [out], None
        if not self._last(action):
            outs = self._with_grad(out)
            grads = self.links.recv_backward(self._stream_shapes(action.microbatch, with_grad_only=True), self.dtype)
            grads = [g.to(o.dtype) for g, o in zip(grads, outs, strict=True)]
        inputs = self._with_grad(received)
        if not self.split:
            torch.autograd.backward(outs, grads)
        else:
            self.weight_work[action[1:]] = backward_input(outs, grads, inputs)
        if received:
            self.links.send_backward([r.grad for r in inputs])

    def _weights(self, action, saved):
        """The weights' gradients, from what `_backward` kept."""
        self._start_backward(action)
        self.weight_work.pop(action[1:])()
