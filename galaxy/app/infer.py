"""Forward-only inference in any layout the config names: BERT (masked-LM logits), the BART
encoder (its last hidden states), LLaMA prefill (logits). Each request is timed end to end on
every rank (a barrier first, so all start together); a request's latency is the slowest rank's
wall-clock time, since the answer is ready only when every rank is done. Rank 0 prints the
latency percentiles and the throughput. Pipeline stages (BERT, LLaMA) run one request through
one after another; the last stage's ranks hold the output. Between requests the model may move
to another split (config replan); under --elastic, when a rank is lost mid-request, the survivors
of a layout whose ranks share every layer rebuild their model for the smaller world in place and
serve that request again (`Server`, `recover`).

An entry script only names its default config:

    infer.main(__doc__, "train_config/bert/galaxy/full.json")
"""
import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from galaxy.app import cli, outputs
from galaxy.app.session import join, load_model
from galaxy.data import DataError, text_lines
from galaxy.data.build import load_tokenizer
from galaxy.models.registry import MODELS
from galaxy.pipeline.engine import pipeline_streams
from galaxy.pipeline.p2p import StageLinks
from galaxy.planner.replan import Replanner
from galaxy.reshard.relayout import Holding, build_lost_part, fill as fill_after_loss
from galaxy.runtime import elastic, health, launch


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must not be negative")
    return value


def text_file(path):
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"{path} is not a file")
    try:
        if not read_lines(path):
            raise argparse.ArgumentTypeError(f"{path} has no text")
    except DataError as e:  # argparse would say only "invalid text_file value"
        raise argparse.ArgumentTypeError(str(e)) from None
    return path


def read_lines(path):
    return [line for _, line in text_lines(path) if line.strip()]


def add_args(parser):
    group = parser.add_argument_group("inference")
    group.add_argument("--requests", type=positive_int, default=50, help="timed requests")
    group.add_argument("--warmup", type=non_negative_int, default=5, help="untimed requests first")
    group.add_argument("--batch_size", type=positive_int, default=1,
                       help="sequences per request (not the config's training batch_size)")
    group.add_argument("--texts", type=text_file, default=None,
                       help="one text a line, tokenized with tokenizer_file and padded to seq_length "
                            "(default: random tokens, seq_length of them)")


def forward_fn(model, name):
    """What one request computes: the output callers read, replicated on every rank (with
    pipeline stages: on the last stage's ranks; the others return None)."""
    if name == "bart":  # no pipeline stages (refused by its check)
        return lambda ids, mask: model.model.encode(ids, mask)
    forward = (lambda ids, mask, x=None: model(ids, mask, hidden_states=x))  # BERT MLM / LLaMA prefill logits
    return pipelined(forward, model) if model.ctx.plan.pp_size > 1 else forward


def pipelined(forward, model):
    """One request through the stages: receive what the previous stage hands on (its hidden
    states, and whatever else the model says), run this stage's layers, send the result on."""
    ctx, links = model.ctx, StageLinks(model.ctx)
    widths = [width for width, _ in pipeline_streams(model, model.config.hidden_size)]
    dtype = next(model.parameters()).dtype  # activations travel in the weights' dtype

    def stage(ids, mask):
        received = None
        if not ctx.is_first_stage:
            got = links.recv_forward([(*ids.shape, width) for width in widths], dtype)
            received = got[0] if len(got) == 1 else tuple(got)
        out = forward(ids, mask, received)
        if ctx.is_last_stage:
            return out
        links.send_forward(list(out) if isinstance(out, tuple) else [out])
        links.finish()  # this stage's part of the request ends once the next stage has its input
        return None
    return stage


def synthetic_batches(cfg, batch_size, count):
    """Random token ids, the same on every rank (one generator seeded by the run's seed)."""
    g = torch.Generator().manual_seed(cfg["seed"])
    for _ in range(count):
        yield torch.randint(cfg["vocab_size"], (batch_size, cfg["seq_length"]), generator=g), None


def text_batches(cfg, path, batch_size, count):
    """The file's lines in turn, each [bos] text ([eos] for the encoders) cut and padded to
    seq_length: sequence-sharded layouts split a fixed number of positions. Returns the batches
    and what the cut dropped ("" if nothing)."""
    tok, length = load_tokenizer(cfg), cfg["seq_length"]
    ends = [tok.eos_id] if cfg["model"] != "llama" else []
    lines = [[tok.bos_id] + tok.encode(line) + ends for line in read_lines(path)]
    rows = [lines[i % len(lines)][:length] for i in range(batch_size * count)]
    ids = torch.tensor([row + [tok.pad_id] * (length - len(row)) for row in rows]).view(count, batch_size, -1)
    long = [len(line) - length for line in lines if len(line) > length]
    cut = (f"--texts {path}: {len(long)} of {len(lines)} lines are longer than seq_length {length} tokens and were "
           f"cut to it ({sum(long)} tokens dropped)") if long else ""
    return ((b, (b != tok.pad_id).long()) for b in ids), cut


def serve(forward, batches, ctx, after_request=None, first=0):
    """Yield (output, latency in seconds) for each (input_ids, attention_mask) batch, numbered from
    `first`; after_request(index), when given, runs between requests, untimed (re-planning)."""
    with torch.no_grad():
        for index, (ids, mask) in enumerate(batches, first):
            if index and after_request:
                after_request(index)
            ids, mask = ids.to(ctx.device), None if mask is None else mask.to(ctx.device)
            if ctx.world > 1:
                dist.barrier()
            start = time.perf_counter()
            out = forward(ids, mask)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64, device=ctx.device)
            if ctx.world > 1:
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            yield out, elapsed.item()


class Server(Holding):
    """This rank's side of a run of requests. Between requests, live re-planning (config replan)
    may move the model to another split; with `regroups` > 0 (--elastic in a layout whose ranks
    share every layer), a rank lost mid-request makes the survivors re-plan for the smaller world
    in place (`recover`) and serve that request again; `recoveries` records what each moved."""

    def __init__(self, model, ctx, cfg, regroups=0, verbose=False):
        super().__init__(model, ctx, cfg)
        self.regroups, self.recoveries, self.verbose = regroups, [], verbose
        self.members = list(range(ctx.world))  # the launch's rank numbers of the ranks the model is laid out over
        self._watch()

    def _watch(self):
        """Live re-planning (config replan) of the ranks the model is now laid out over, when it splits layers."""
        self.replanner = None
        if self.cfg["replan"] and self.ctx.tp_size > 1:
            self.replanner = Replanner(self.model, self.ctx, self.cfg, self,
                                       log=lambda line: print(f"[rank 0] {line}", flush=True), verbose=self.verbose)

    def forward(self, ids, mask):
        return forward_fn(self.model, self.cfg["model"])(ids, mask)

    def run(self, batches, keep=lambda out: None):
        """[(latency, keep(output))] of every batch, in order."""
        results, batches, recovered = [], list(batches), False
        while len(results) < len(batches):
            after = self.replanner.after_step if self.replanner else None
            try:
                if recovered:  # a survivor may have finished the request the others lost
                    done = torch.tensor([len(results)], device=self.ctx.device)
                    dist.all_reduce(done, op=dist.ReduceOp.MIN)
                    del results[int(done):]
                    recovered = False
                for out, latency in serve(self.forward, batches[len(results):], self.ctx, after, len(results)):
                    results.append((latency, keep(out)))
            except Exception as e:  # a peer's loss surfaces as whatever its collective raised
                self._recover(e, len(results))
                recovered = True
        return results

    def _recover(self, error, served):
        """Re-plan in place after `error` (one of `regroups` each time); again when a survivor is
        lost while the others re-plan: the model under the old plan still holds this rank's rows."""
        while True:
            if not (self.regroups and health.is_comm_error(error)):
                raise error
            self.regroups -= 1
            try:
                cfg, model, ctx, moved = recover(self, error, served, self.members)
                break
            except Exception as e:
                error = e
        self.members = list(health.current().members)
        self.recoveries.append(moved)
        self.adopt(model, ctx, cfg)
        self._watch()


def recover(holding, error, served, members):
    """After a collective failed with `error`: regroup with the survivors (galaxy.runtime.health),
    re-plan for them (galaxy.runtime.elastic) and rebuild this rank's model in the new plan from its
    own rows, its peers' and the lost ranks' rows rebuilt from the run's sources
    (galaxy.reshard.relayout). `members`: the launch's numbers of the ranks of the holding's plan.
    Returns (cfg, model, ctx) for the survivors and what moved: the lost ranks (numbered as in the
    old plan), the bytes the survivors kept in place, sent each other and rebuilt from the sources,
    and the seconds it took."""
    start, rendezvous, model, ctx, cfg = time.perf_counter(), health.current(), holding.model, holding.ctx, holding.cfg
    if rendezvous is None:
        raise error
    gone = rendezvous.regroup(error, dist.get_backend() if dist.is_initialized() else launch.default_backend(),
                              cfg["timeout_s"])
    lost = [i for i, r in enumerate(members) if r in gone]
    new_cfg, plan = elastic.go_on(cfg, ctx.plan, lost)
    new, new_ctx = holding.empty(new_cfg, join(new_cfg, plan, dist.get_rank()))
    holders, rebuilt = [model], 0
    for i, rank in enumerate(lost):  # the i-th lost rank's rows are rebuilt by survivor i (round robin)
        part = None
        if i % plan.world == new_ctx.rank:
            part, size = build_lost_part(cfg, ctx.plan, rank, new_ctx.device)
            part.to(next(model.parameters()).dtype).train(model.training)
            rebuilt += size
        holders.append(part)
    moved = fill_after_loss(new, holders, new_ctx)
    total = torch.tensor([moved["kept"], moved["received"], rebuilt], dtype=torch.float64, device=new_ctx.device)
    dist.all_reduce(total)
    moved = dict(zip(("kept", "received", "rebuilt"), map(int, total.tolist())), lost=lost,
                 seconds=time.perf_counter() - start)
    if new_ctx.rank == 0:
        print(f"[rank 0] elastic: lost rank(s) {lost} during request {served}; {_moved_line(cfg, plan, moved)}",
              flush=True)
    return new_cfg, new, new_ctx, moved


def _moved_line(cfg, plan, moved):
    files = [cfg[key] for key in ("load_checkpoint", "load_trainable") if cfg[key]]
    source = " and ".join(files) if files else f"the seed's weights (seed {cfg['seed']})"
    return (f"{launch.survivors_phrase(plan.world)} re-planned in place in {moved['seconds']:.2f} s: "
            f"plan {plan.describe()}; weights kept in place {moved['kept'] / 2**20:.2f} MiB, moved between "
            f"survivors {moved['received'] / 2**20:.2f} MiB, rebuilt from {source} {moved['rebuilt'] / 2**20:.2f} MiB "
            f"(the lost rows only)")


def summary(latencies, batch_size, seq_length):
    """The percentiles line; throughput is of requests served one after another."""
    ms = torch.tensor(latencies, dtype=torch.float64) * 1e3
    p50, p90, p99 = torch.quantile(ms, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    per_s = len(latencies) * batch_size / (ms.sum().item() / 1e3)
    return (f"latency over {len(latencies)} requests (batch {batch_size}, {seq_length} tokens): "
            f"p50 {p50:.2f} ms, p90 {p90:.2f} ms, p99 {p99:.2f} ms, mean {ms.mean().item():.2f} ms; "
            f"throughput {per_s:.2f} sequences/s ({per_s * seq_length:.0f} tokens/s)")


def eval_model(cfg, plan, rank):
    """This rank's part of the model in eval mode (dropout off), and its ctx."""
    ctx = join(cfg, plan, rank)
    model, _ = load_model(cfg, ctx, rank)
    return model.eval(), ctx


def prepare(cfg, plan, rank):
    """This rank's part of the model, ready for requests: returns (forward, ctx) for serve."""
    model, ctx = eval_model(cfg, plan, rank)
    return forward_fn(model, cfg["model"]), ctx


def infer(rank, world, cfg, plan, args):
    model, ctx = eval_model(cfg, plan, rank)
    regroups = cfg["elastic_restarts"] if cfg["elastic"] and elastic.in_place(plan, resumes=False) else 0
    server = Server(model, ctx, cfg, regroups, args.verbose)
    count = args.warmup + args.requests
    batches, cut = (text_batches(cfg, args.texts, args.batch_size, count) if args.texts
                    else (synthetic_batches(cfg, args.batch_size, count), ""))
    if cut and rank == 0:
        print(f"[rank 0] {cut}", flush=True)
    latencies = [latency for latency, _ in server.run(batches)][args.warmup:]
    if server.ctx.rank != 0:
        return
    print(f"[rank 0] plan: {server.ctx.plan.describe()}", flush=True)  # after any move
    print(summary(latencies, args.batch_size, server.cfg["seq_length"]), flush=True)
    if args.metrics_file:
        with open(args.metrics_file, "a", encoding="utf-8") as f:
            for i, latency in enumerate(latencies):
                f.write(json.dumps({"request": i, "latency_s": latency}) + "\n")


def main(doc, default_config, argv=None):
    """Parse and check everything (errors stop here, before any process starts), then infer on
    this rank, or on every rank spawned here."""
    args, cfg, plan, world, rank = cli.parse(doc.splitlines()[0], default_config, argv, add_args,
                                             metrics="one JSON line per timed request (request, latency_s)")
    if args.explain or args.trace_dir:
        raise SystemExit("galaxy: --explain and --trace_dir record a training step; inference has neither yet")
    if plan.virtual_stages > 1:
        cli.reject(f"virtual_stages {plan.virtual_stages}: inference runs each rank's layers as one stage "
                   "(virtual_stages 1)")
    cli.check(MODELS[cfg["model"]].check, cfg, plan)
    cli.check(elastic.check, cfg, plan, rank, resumes=False)
    outputs.check_outputs(None, args.metrics_file)
    launch.run(infer, world, rank, (cfg, plan, args), args.init_method,
               cfg["distributed_backend"], cfg["timeout_s"], args.threads, args.debug,
               **elastic.launch_args(cfg, plan, resumes=False))
