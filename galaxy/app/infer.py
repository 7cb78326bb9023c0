"""Forward-only inference in any layout the config names: BERT (masked-LM logits), the BART
encoder (its last hidden states), LLaMA prefill (logits); with --task and --output, answers for
every line of --texts (galaxy.app.answers: embeddings, filled masks, greedy continuations, BART's
denoised text), one JSON line each, in input order. Each request is timed end to end on
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
import os
import pickle
import time
from pathlib import Path

import torch
import torch.distributed as dist

from galaxy.app import cli, outputs, serve as http
from galaxy.app.answers import TASKS, Ask, answer_json, check_task
from galaxy.app.session import join, load_model
from galaxy.data import text_lines
from galaxy.data.build import load_tokenizer, tokenizer_path
from galaxy.inference.generate import through_stages
from galaxy.models.registry import MODELS
from galaxy.planner.replan import Replanner
from galaxy.profiler import emulate, observe
from galaxy.reshard.relayout import Holding, build_like, build_lost_part, fill as fill_after_loss
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


@cli.argument  # its ValueErrors (a DataError too) are the message: argparse would say only "invalid text_file value"
def text_file(path):
    if not Path(path).is_file():
        raise ValueError(f"{path} is not a file")
    if not read_lines(path):
        raise ValueError(f"{path} has no text")
    return path


def read_lines(path):
    return [line for _, line in text_lines(path) if line.strip()]


REQUESTS = 50  # timed requests when --requests is not given


def add_args(parser):
    group = parser.add_argument_group("inference")
    group.add_argument("--requests", type=positive_int, default=None,
                       help=f"timed requests of random tokens or --texts' lines in turn (default {REQUESTS}; "
                            "not with --output, which answers every line once)")
    group.add_argument("--warmup", type=non_negative_int, default=5, help="untimed requests first")
    group.add_argument("--batch_size", type=positive_int, default=1,
                       help="sequences per request (not the config's training batch_size)")
    group.add_argument("--texts", type=text_file, default=None,
                       help="one text a line, tokenized with tokenizer_file (or load_checkpoint's tokenizer) "
                            "and cut and padded to seq_length (default: random tokens, seq_length of them)")
    group.add_argument("--task", choices=sorted(TASKS), default=None,
                       help="what to answer for each line of --texts: embed (BERT: mean-pooled, normalised "
                            "sentence embeddings), fill-mask (BERT: top_k tokens at each mask token), generate "
                            "(LLaMA: greedy continuation), denoise (BART: the decoder's greedy reconstruction of the text, "
                            "its [MASK] spans filled in); needs --output")
    group.add_argument("--output", default=None,
                       help="--task's answers, one JSON line per line of --texts in input order (overwritten)")
    group.add_argument("--top_k", type=positive_int, default=5, help="fill-mask: tokens listed per mask")
    group.add_argument("--max_new_tokens", type=positive_int, default=32, help="generate, denoise: new tokens at most")
    group.add_argument("--serve", type=http.address, default=None, metavar="HOST:PORT",
                       help="keep the model loaded and answer HTTP on HOST:PORT (rank 0; port 0: any free one): "
                            "POST /v1/embeddings (BERT), POST /v1/completions (LLaMA, greedy), GET /health; "
                            "--batch_size texts at most a round; SIGTERM / Ctrl-C stops every rank")
    cli.add_device_args(parser)


def forward_fn(model, name, ask=None):
    """What one request computes: the output callers read, replicated on every rank (with
    pipeline stages: on the last stage's ranks; the others return None), or `ask`'s answers
    (galaxy.app.answers), on every rank."""
    if ask and model.ctx.plan.pp_size > 1:  # the last stage's answers: one broadcast from its first rank (small)
        staged, ctx = through_stages(model, ask.forward(model)), model.ctx

        def everywhere(ids, mask):
            box = [staged(ids, mask)]
            dist.broadcast_object_list(box, src=ctx.world - ctx.plan.tp_size * ctx.plan.dp_size, device=ctx.device)
            return box[0]
        return everywhere
    if ask:
        return ask.forward(model)
    if name == "bart":  # no pipeline stages (refused by its check)
        return lambda ids, mask: model.model.encode(ids, mask)
    if name == "bert_retrieval":  # its output is the sentence embedding (no pipeline stages: refused by its check)
        return model.embed
    return through_stages(model, model) if model.ctx.plan.pp_size > 1 else model  # BERT MLM / LLaMA prefill logits


def synthetic_batches(cfg, batch_size, count):
    """Random token ids, the same on every rank (one generator seeded by the run's seed)."""
    g = torch.Generator().manual_seed(cfg["seed"])
    for _ in range(count):
        yield torch.randint(cfg["vocab_size"], (batch_size, cfg["seq_length"]), generator=g), None


def text_batches(cfg, path, batch_size, count):
    """The file's lines in turn, batch_size a batch, count batches (see encode); and what seq_length
    cut of them ("" if nothing)."""
    tok, lines, length = load_tokenizer(cfg), read_lines(path), cfg["seq_length"]
    texts = [lines[i % len(lines)] for i in range(batch_size * count)]
    long = [n - length for n in (len(tok.encode_with_special_tokens(line)) for line in lines) if n > length]
    cut = (f"--texts {path}: {len(long)} of {len(lines)} lines are longer than seq_length {length} tokens and were "
           f"cut to it ({sum(long)} tokens dropped)") if long else ""
    return [encode(tok, texts[i:i + batch_size], cfg) for i in range(0, len(texts), batch_size)], cut


def encode(tok, texts, cfg):
    """(input_ids, attention_mask) of texts, each with the tokenizer's special tokens, cut and
    padded to seq_length: sequence-sharded layouts and pipeline stages split a fixed length."""
    return tok.encode_batch(texts, max_length=cfg["seq_length"], pad_to_max_length=True)


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

    def __init__(self, model, ctx, cfg, regroups=0, verbose=False, device=None):
        super().__init__(model, ctx, cfg)
        self.regroups, self.recoveries, self.verbose = regroups, [], verbose
        self.device = device or emulate.NoDevice()  # an emulated device's throughput changes between requests
        self.members = list(range(ctx.world))  # the launch's rank numbers of the ranks the model is laid out over
        self.served, self.on_request = 0, None  # --trace_dir's callback for each request that ends (`step_span`)
        self._watch()

    def _watch(self):
        """Live re-planning (config replan) of the ranks the model is now laid out over, when it splits layers."""
        self.replanner = None
        if self.cfg["replan"] is not None and self.ctx.tp_size > 1:
            self.replanner = Replanner(self.model, self.ctx, self.cfg, self,
                                       log=lambda line: print(f"[rank 0] {line}", flush=True), verbose=self.verbose)

    def run(self, batches, keep=lambda out: None, ask=None):
        """[(latency, keep(output))] of every batch, in order; the output is `ask`'s answers when given."""
        results, batches = [], list(batches)
        forward = lambda ids, mask: forward_fn(self.model, self.cfg["model"], ask)(ids, mask)  # the model of now
        while len(results) < len(batches):
            try:
                for out, latency in serve(forward, batches[len(results):], self.ctx, self._after_request,
                                          len(results)):
                    results.append((latency, keep(out)))
                    self.served = len(results)
                    if self.on_request:
                        self.on_request({"step": self.served, "step_time_s": latency})
            except Exception as e:  # a peer's loss surfaces as whatever its collective raised
                # a survivor may have finished the request the others lost: all go on from the agreed count
                del results[self._recover(e, len(results)):]
        return results

    def _after_request(self, index):
        """Between requests (`index` of them served): an emulated device's change, then re-planning."""
        self.device.after_step(index)
        if self.replanner:
            self.replanner.after_step(index)

    def follow(self, take, give, tok):
        """Serve rounds until rank 0's take() says "stop" (galaxy.app.serve): each round, rank 0's
        take() gives "idle", "stop" or a round (.ask, .texts), shared with every rank (`share`);
        every rank computes its answers and rank 0 hands them to give(round, answers, latency). A
        loss (with regroups left) regroups the survivors and serves the round again: rank 0 keeps
        it until it is answered. Returns the rounds served."""
        served, pending, asked = 0, [None], {}

        def rounds():  # the (input_ids, attention_mask) of each round, as rank 0 shares them
            while True:
                if self.ctx.rank == 0 and pending[0] is None:
                    pending[0] = take()
                part = pending[0]  # rank 0 shares "idle", "stop" or (ask, texts), not the waiting requests
                work = share(part if part is None or isinstance(part, str) else (part.ask, part.texts), self.ctx)
                if work == "stop":
                    return
                if work == "idle":
                    pending[0] = None
                    continue
                asked["ask"], texts = work
                yield encode(tok, texts, self.cfg)

        forward = lambda ids, mask: forward_fn(self.model, self.cfg["model"], asked["ask"])(ids, mask)  # noqa: E731
        while True:
            try:
                for out, latency in serve(forward, rounds(), self.ctx, self._after_request, served):
                    served += 1
                    if self.ctx.rank == 0:
                        give(pending[0], out, latency)
                    pending[0] = None
                return served
            except Exception as e:  # a peer's loss surfaces as whatever its collective raised
                self._recover(e, served)

    def _recover(self, error, served):
        """Re-plan in place after `error` (one of `regroups` each time); again when a survivor is
        lost while the others re-plan: the model under the old plan still holds this rank's rows.
        Returns the requests every survivor served (this rank served `served`)."""
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
        return moved["served"]


def share(obj, ctx):
    """Rank 0's picklable `obj` on every rank. All-reduces, not a broadcast: every rank exchanges
    with its neighbours, so a lost rank fails every rank's call, not only the root's."""
    if ctx.world == 1:
        return obj
    data = pickle.dumps(obj) if ctx.rank == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.long, device=ctx.device)
    dist.all_reduce(size)
    buffer = torch.zeros(int(size), dtype=torch.uint8, device=ctx.device)
    if ctx.rank == 0:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.all_reduce(buffer)  # zeros elsewhere: the sum is rank 0's bytes
    return pickle.loads(buffer.cpu().numpy().tobytes())


def recover(holding, error, served, members):
    """After a collective failed with `error`: regroup with the survivors (galaxy.runtime.health),
    re-plan for them (galaxy.runtime.elastic) and rebuild this rank's model in the new plan from its
    own rows, its peers' and the lost ranks' rows rebuilt from the run's sources
    (galaxy.reshard.relayout). `members`: the launch's numbers of the ranks of the holding's plan.
    Returns (cfg, model, ctx) for the survivors and what moved: the lost ranks (numbered as in the
    old plan), the bytes the survivors kept in place, sent each other and rebuilt from the sources,
    the requests every survivor had served (this rank: `served`) and the seconds it took."""
    start, rendezvous, model, ctx, cfg = time.perf_counter(), health.current(), holding.model, holding.ctx, holding.cfg
    if rendezvous is None:
        raise error
    gone = rendezvous.regroup(error, dist.get_backend() if dist.is_initialized() else launch.default_backend(),
                              cfg["timeout_s"])
    lost = [i for i, r in enumerate(members) if r in gone]
    new_cfg, plan = elastic.go_on(cfg, ctx.plan, lost)
    new, new_ctx = build_like(holding, new_cfg, join(new_cfg, plan, dist.get_rank()))
    # the i-th lost rank's rows are rebuilt by survivor i (round robin); (part, bytes rebuilt)
    parts = [build_lost_part(cfg, ctx.plan, rank, model, new_ctx.device) if i % plan.world == new_ctx.rank
             else (None, 0) for i, rank in enumerate(lost)]
    moved = fill_after_loss(new, [model] + [part for part, _ in parts], new_ctx)
    rebuilt = sum(size for _, size in parts)
    total = torch.tensor([moved["kept"], moved["received"], rebuilt], dtype=torch.float64, device=new_ctx.device)
    dist.all_reduce(total)
    agreed = torch.tensor([served], device=new_ctx.device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)  # a lagging survivor's count: the request lost is its next
    moved = dict(zip(("kept", "received", "rebuilt"), map(int, total.tolist()), strict=True), lost=lost,
                 served=int(agreed), seconds=time.perf_counter() - start)
    if new_ctx.rank == 0:
        files = [cfg[key] for key in ("load_checkpoint", "load_trainable") if cfg[key]]
        source = " and ".join(files) if files else f"the seed's weights (seed {cfg['seed']})"
        print(f"[rank 0] elastic: lost rank(s) {lost} during request {moved['served']}; "
              f"{launch.survivors_phrase(plan.world)} re-planned in place in {moved['seconds']:.2f} s: "
              f"plan {plan.describe()}; weights kept in place {moved['kept'] / 2**20:.2f} MiB, moved between "
              f"survivors {moved['received'] / 2**20:.2f} MiB, rebuilt from {source} {moved['rebuilt'] / 2**20:.2f} "
              f"MiB (the lost rows only)", flush=True)
    return new_cfg, new, new_ctx, moved


def summary(latencies, batch_size, seq_length, sequences=None):
    """The percentiles line; throughput is of requests served one after another (`sequences` in
    all: default batch_size each)."""
    ms = torch.tensor(latencies, dtype=torch.float64) * 1e3
    p50, p90, p99 = torch.quantile(ms, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    per_s = (sequences or len(latencies) * batch_size) / (ms.sum().item() / 1e3)
    return (f"latency over {len(latencies)} requests (batch {batch_size}, {seq_length} tokens): "
            f"p50 {p50:.2f} ms, p90 {p90:.2f} ms, p99 {p99:.2f} ms, mean {ms.mean().item():.2f} ms; "
            f"throughput {per_s:.2f} sequences/s ({per_s * seq_length:.0f} tokens/s)")


def eval_model(cfg, plan, rank):
    """This rank's part of the model in eval mode (dropout off), and its ctx."""
    ctx = join(cfg, plan, rank)
    model, _ = load_model(cfg, ctx, rank)
    return model.eval(), ctx


def infer(rank, world, cfg, plan, args):
    model, ctx = eval_model(cfg, plan, rank)
    regroups = cfg["elastic_restarts"] if cfg["elastic"] and elastic.in_place(plan, resumes=False) else 0
    log = (lambda line: print(f"[rank 0] {line}", flush=True)) if rank == 0 else None
    device = emulate.device(args.device_gflops, args.device_gflops_after, rank, log, unit="request")
    server = Server(model, ctx, cfg, regroups, args.verbose, device)
    with observe.traced(args.trace_dir, rank, model, lambda: server.served + 1) as server.on_request, device:
        if args.serve:
            return serve_http(server, args)
        if args.output:
            return answer_file(server, args)
        count = args.warmup + (args.requests or REQUESTS)
        batches, cut = (text_batches(cfg, args.texts, args.batch_size, count) if args.texts
                        else (synthetic_batches(cfg, args.batch_size, count), ""))
        if cut and rank == 0:
            print(f"[rank 0] {cut}", flush=True)
        latencies = [latency for latency, _ in server.run(batches)][args.warmup:]
    report(server, args, latencies)


def report(server, args, latencies, sequences=None):
    """Rank 0 prints the plan (after any move) and the latency line, and appends to --metrics_file."""
    if server.ctx.rank != 0:
        return
    print(f"[rank 0] plan: {server.ctx.plan.describe()}", flush=True)
    print(summary(latencies, args.batch_size, server.cfg["seq_length"], sequences), flush=True)
    if args.metrics_file:
        with open(args.metrics_file, "a", encoding="utf-8") as f:
            f.writelines(json.dumps({"request": i, "latency_s": latency}) + "\n" for i, latency in enumerate(latencies))


def ask_for(task, args, tok):
    # BART reconstructs [CLS] text [SEP] and starts decoding from [SEP] (galaxy.data.denoising)
    ends = dict(bos_id=tok.cls_id, eos_id=tok.sep_id) if task == "denoise" else dict(eos_id=tok.eos_id)
    return Ask(task, top_k=args.top_k, max_new_tokens=args.max_new_tokens, mask_id=tok.mask_id, **ends)


def serve_http(server, args):
    """--serve: every rank follows rank 0's rounds (Server.follow) until SIGTERM / SIGINT reaches
    rank 0; rank 0 answers HTTP (galaxy.app.serve.Front)."""
    tok, signals = load_tokenizer(server.cfg), launch.SignalFlag()
    pids = [os.getpid()] * server.ctx.world
    if server.ctx.world > 1:
        dist.all_gather_object(pids, os.getpid())
    front = None
    if server.ctx.rank == 0:
        health = lambda: {"world": server.ctx.world, "plan": server.ctx.plan.describe(),  # noqa: E731
                          "pids": [pids[r] for r in server.members]}
        wait_s = server.cfg["timeout_s"] * (server.regroups + 2)  # a round, and a regroup for each loss allowed
        front = http.Front(server.cfg, tok, *args.serve, args.batch_size, wait_s, health,
                           stop=lambda: signals.signum != 0)
        print(f"[rank 0] serving on {front.url} (POST {', POST '.join(front.paths)}, GET /health)", flush=True)
    try:
        served = server.follow(front.take if front else None, front.give if front else None, tok)
    except BaseException as e:
        if front:
            front.close(launch.cause(e))
        raise
    if front:
        front.close()
        print(f"[rank 0] stopped by signal {signals.signum} after {served} rounds", flush=True)


def answer_file(server, args):
    """Every line of --texts answered once, batch_size lines a request (--warmup untimed copies of
    the first request before them); rank 0 writes the answers to --output and the timing report."""
    tok, lines = load_tokenizer(server.cfg), [line for _, line in text_lines(args.texts)]
    ask = ask_for(args.task, args, tok)
    batches = [encode(tok, lines[i:i + args.batch_size], server.cfg) for i in range(0, len(lines), args.batch_size)]
    results = server.run(batches[:1] * args.warmup + batches, keep=lambda out: out, ask=ask)[args.warmup:]
    if server.ctx.rank != 0:
        return
    answers = [answer for _, batch in results for answer in batch]
    tmp = f"{args.output}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for i, (text, answer) in enumerate(zip(lines, answers, strict=True)):
            cut = len(tok.encode_with_special_tokens(text)) > server.cfg["seq_length"]
            f.write(json.dumps({"index": i, "text": text, "truncated": cut, **answer_json(ask, answer, tok)}) + "\n")
    os.replace(tmp, args.output)
    print(f"[rank 0] {args.task}: {len(lines)} answers written to {args.output}", flush=True)
    report(server, args, [latency for latency, _ in results], sequences=len(lines))


def main(doc, default_config, argv=None):
    """Parse and check everything (errors stop here, before any process starts), then infer on
    this rank, or on every rank spawned here."""
    args, cfg, plan, world, rank = cli.parse(doc.splitlines()[0], default_config, argv, add_args,
                                             metrics="one JSON line per timed request (request, latency_s)")
    if args.explain:
        cli.refuse("--explain records a training step; inference has no --explain yet")
    if args.trace_dir and (cfg["replan"] is not None or cfg["elastic"]):
        cli.refuse("--trace_dir traces the model a run starts with; replan and --elastic may rebuild it")
    if plan.virtual_stages > 1:
        cli.reject(f"virtual_stages {plan.virtual_stages}: inference runs each rank's layers as one stage "
                   "(virtual_stages 1)")
    cli.check(MODELS[cfg["model"]].check, cfg, plan)
    check_answers(args, cfg)
    cli.check(elastic.check, cfg, plan, rank, resumes=False)
    outputs.check_outputs(None, args.metrics_file)
    launch.run(infer, world, rank, (cfg, plan, args), args.init_method,
               cfg["distributed_backend"], cfg["timeout_s"], args.threads, args.debug,
               **elastic.launch_args(cfg, plan, resumes=False))


def check_answers(args, cfg):
    """--task, --output and their options: what the model (and its tokenizer) can answer, and where; or --serve's."""
    if args.serve:
        return check_serving(args, cfg)
    if args.output is None and args.task is None:
        return
    if not (args.output and args.task and args.texts):
        cli.refuse("--task answers the lines of --texts into --output: give all three")
    if args.requests is not None:
        cli.refuse("--requests: with --output every line of --texts is answered once")
    if Path(args.output).resolve() == Path(args.texts).resolve():
        cli.refuse(f"--output {args.output} is --texts: the answers would overwrite the questions")
    if Path(args.output).is_dir():
        cli.refuse(f"--output {args.output} is a directory")
    outputs.check_writable(Path(args.output).parent, f"--output {args.output}: directory")
    problem = check_task(args.task, cfg["model"])
    if problem:
        cli.refuse(f"--task: {problem}")
    if args.task == "fill-mask":
        if args.top_k > cfg["vocab_size"]:
            cli.refuse(f"--top_k {args.top_k} exceeds vocab_size {cfg['vocab_size']}")
        if load_tokenizer(cfg).mask_id is None:
            cli.refuse(f"--task fill-mask: tokenizer {tokenizer_path(cfg)} has no mask token")
    if args.task == "generate":
        limit = MODELS["llama"].config.from_dict(cfg).position_limit
        if cfg["seq_length"] + args.max_new_tokens > limit:
            cli.refuse(f"--task generate: seq_length {cfg['seq_length']} (the longest prompt) + "
                       f"--max_new_tokens {args.max_new_tokens} exceeds the model's {limit} positions")
    if args.task == "denoise":
        if args.max_new_tokens > cfg["seq_length"]:  # the decoder reruns over seq_length positions (greedy_denoise)
            cli.refuse(f"--task denoise: --max_new_tokens {args.max_new_tokens} exceeds seq_length "
                       f"{cfg['seq_length']}, the positions BART's decoder runs over")
        tok = load_tokenizer(cfg)
        if tok.cls_id is None or tok.sep_id is None:
            cli.refuse(f"--task denoise: tokenizer {tokenizer_path(cfg)} has no [CLS] / [SEP], which frame "
                       "what BART reconstructs")


def check_serving(args, cfg):
    """--serve answers what the model can: it takes no --task, --output or --requests."""
    given = [flag for flag, value in (("--task", args.task), ("--output", args.output), ("--requests", args.requests),
                                      ("--texts", args.texts)) if value is not None]
    if given:
        cli.refuse(f"--serve answers HTTP requests, not with {', '.join(given)} (a run over --texts)")
    served = sorted(task for task, _ in http.ENDPOINTS.values())
    if all(check_task(task, cfg["model"]) for task in served):
        cli.refuse(f"--serve: a {cfg['model']} model answers none of {served}")
    problem = http.check_address(*args.serve)
    if problem:
        cli.refuse(problem)
