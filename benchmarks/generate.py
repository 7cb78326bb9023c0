"""Greedy generation's tokens/s per layout beside serial, prefill and decode timed apart (gloo, this machine's CPUs).

    python -m benchmarks.generate                      # LLaMA-tiny shape (hidden 256, 4 layers, GQA), world 2
    python -m benchmarks.generate --world 3 --prompt 128 --new_tokens 32 --repeats 5

Every layout generates from the same random-weight model (the config's seed) and the same random
prompt, with uneven splits (world 2: heads [6, 2], columns [448, 240], positions 3 : 1, stages
[3, 1]; world 3: [4, 2, 2], [344, 172, 172], 2 : 1 : 1, [2, 1, 1]; `--key value` overrides any).
Prefill is the prompt's step (its batch x prompt tokens through the model, and the first new
token); decode the remaining new tokens, one step each. A step's time is the slowest rank's; serial
runs on rank 0 while the others wait. Layouts are timed interleaved, each round in another order,
and the medians printed; the tokens of every layout are checked against serial's. The ranks share
this machine's cores, so these are the engine's overheads and collectives on one host, not a
measure of devices.
"""
import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.common import table
from galaxy.app.cli import config_overrides
from galaxy.comm.context import ParallelContext
from galaxy.config.load import load_config
from galaxy.errors import ConfigError
from galaxy.inference.generate import greedy_steps
from galaxy.models.llama import LlamaConfig, LlamaForCausalLM
from galaxy.plan import build_plan
from galaxy.runtime.launch import spawn

MODEL = Path(__file__).resolve().parents[1] / "train_config" / "model" / "llama_tiny.json"
LAYOUTS = ("serial", "tp", "galaxy", "galaxy2", "sp", "pp")
SPLITS = {2: dict(tp_num_attention_heads_list=[6, 2], tp_intermediate_size_list=[448, 240], seq_scatter_list=[3, 1],
                  stage_num_hidden_layers_list=[3, 1]),
          3: dict(tp_num_attention_heads_list=[4, 2, 2], tp_intermediate_size_list=[344, 172, 172],
                  seq_scatter_list=[2, 1, 1], stage_num_hidden_layers_list=[2, 1, 1])}


def layout_config(layout, world, overrides):
    """The model part with the world's split lists and the overrides; only a pipeline keeps the
    stages (they turn pipelining on). Generation reads seq_scatter_list as shares."""
    keys = {**SPLITS.get(world, {}), **overrides}
    if layout != "pp":
        keys.pop("stage_num_hidden_layers_list", None)
    if "seq_scatter_list" in keys:
        keys["seq_length"] = sum(keys["seq_scatter_list"])
    return load_config(MODEL, {**keys, "parallel": layout})


class Layout:
    """One layout's model on this rank (serial: on rank 0 only) and its timed generation."""

    def __init__(self, name, world, rank, overrides):
        self.name = name
        cfg = layout_config(name, world, overrides)
        plan = build_plan(cfg, 1 if name == "serial" else world)
        self.ctx = ParallelContext.create(plan, rank) if plan.world > 1 else ParallelContext(plan, rank)
        self.active = plan.world > 1 or rank == 0
        self.model = LlamaForCausalLM(LlamaConfig.from_dict(cfg), self.ctx) if self.active else None
        self.tokens = None

    def generate(self, prompt, new_tokens):
        """(prefill seconds, decode seconds) on this rank; keeps the tokens."""
        if not self.active:
            return 0.0, 0.0
        start, stamps, tokens = time.perf_counter(), [], []
        for token, _ in greedy_steps(self.model, prompt, new_tokens):
            stamps.append(time.perf_counter())
            tokens.append(token)
        self.tokens = torch.cat(tokens, 1)
        return stamps[0] - start, stamps[-1] - stamps[0]


def bench(rank, world, args):
    torch.set_num_threads(args.threads)
    layouts = [Layout(name, world, rank, args.overrides) for name in args.layouts]
    vocab = load_config(MODEL)["vocab_size"]
    prompt = torch.randint(vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    times = {layout.name: [] for layout in layouts}
    for round_ in range(1 + args.repeats):  # the first round warms up
        k = round_ % len(layouts)
        for layout in layouts[k:] + layouts[:k]:
            dist.barrier()
            took = torch.tensor(layout.generate(prompt, args.new_tokens), dtype=torch.float64)
            dist.all_reduce(took, op=dist.ReduceOp.MAX)  # the answer is ready when the slowest rank is
            if round_:
                times[layout.name].append(took.tolist())
    return times, {layout.name: layout.tokens for layout in layouts}


def rows(times, args):
    tokens_prefill, tokens_decode = args.batch * args.prompt, args.batch * (args.new_tokens - 1)
    base = None
    out = []
    for name, runs in times.items():
        prefill = statistics.median(r[0] for r in runs)
        decode = statistics.median(r[1] for r in runs)
        rate = (tokens_prefill / prefill, tokens_decode / decode if decode else float("nan"))
        base = base or rate  # the first layout, serial by default
        out.append([name, f"{prefill * 1e3:.1f}", f"{rate[0]:.0f}", f"{rate[0] / base[0]:.2f}x",
                     f"{decode * 1e3 / max(args.new_tokens - 1, 1):.2f}", f"{rate[1]:.1f}", f"{rate[1] / base[1]:.2f}x"])
    return out


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="--key value overrides a config key, e.g. --seq_scatter_list [1,1]")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    p.add_argument("--batch", type=int, default=1, help="prompts per step")
    p.add_argument("--prompt", type=int, default=64, help="tokens per prompt")
    p.add_argument("--new_tokens", type=int, default=32, help="tokens generated per prompt (the first by prefill)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--timeout_s", type=float, default=1800)
    args, rest = p.parse_known_args(argv)
    args.overrides = config_overrides(p, rest)
    if args.new_tokens < 2:
        p.error("--new_tokens must be at least 2 (the first comes from prefill)")
    try:  # a bad split fails here, before any rank starts
        for name in args.layouts:
            build_plan(layout_config(name, args.world, args.overrides), 1 if name == "serial" else args.world)
    except ConfigError as e:
        p.error(str(e))
    return args


def main(argv=None):
    args = parse(argv)
    times, tokens = spawn(bench, args.world, (args,), timeout_s=args.timeout_s, threads=args.threads)[0]
    reference = tokens[args.layouts[0]]
    same = [name for name in args.layouts if torch.equal(tokens[name], reference)]
    print(f"LLaMA ({MODEL.name}), world {args.world} on gloo, {args.threads} thread(s)/rank, batch {args.batch}, "
          f"prompt {args.prompt} tokens, {args.new_tokens} new tokens, median of {args.repeats} interleaved rounds")
    print(table(rows(times, args), ["layout", "prefill ms", "prefill tok/s", f"vs {args.layouts[0]}",
                                    "decode ms/token", "decode tok/s", f"vs {args.layouts[0]}"]))
    print(f"tokens equal {args.layouts[0]}'s: {', '.join(same)}"
          + ("" if len(same) == len(args.layouts) else f"; DIFFERENT: {sorted(set(args.layouts) - set(same))}"))


if __name__ == "__main__":
    main()
