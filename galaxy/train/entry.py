"""What every training entry script does: parse and validate (or only --explain the plan),
then on each rank: groups from the plan, a config check across ranks, data, model, tuning
method, Trainer (pipeline schedule when pp > 1, traced with --trace_dir), save.

An entry script only says how to build its model and its data:

    entry.main(__doc__, "x", "train_config/x/full.json", build_model, build_data)

build_model(cfg, ctx) and build_data(cfg, ctx) must be module-level functions (spawned ranks
unpickle them).
"""
import torch
import torch.distributed as dist

from galaxy.comm import launch
from galaxy.comm.context import ParallelContext
from galaxy.data import Tokenizer
from galaxy.explain import explain
from galaxy.models.tuning import apply_tuning
from galaxy.pipeline import PipelineForwardBackward, format_actions
from galaxy.profiler import observe
from galaxy.train import cli
from galaxy.train.config import config_hash
from galaxy.train.loop import Trainer, run_training


def load_tokenizer(cfg):
    tok = Tokenizer(cfg["tokenizer_file"])
    if tok.vocab_size > cfg["vocab_size"]:
        raise SystemExit(f"galaxy: tokenizer {cfg['tokenizer_file']} has {tok.vocab_size} pieces, "
                         f"config vocab_size is {cfg['vocab_size']}")
    return tok


def check_same_config(cfg, ctx):
    """Ranks started with different configs would deadlock or diverge: stop them now."""
    if ctx.world == 1:
        return
    digests = [None] * ctx.world
    dist.all_gather_object(digests, config_hash(cfg))
    if len(set(digests)) > 1:
        raise SystemExit(f"galaxy: ranks were started with different configs (digests {digests})")


def train(rank, world, cfg, plan, args, build_model, build_data):
    """Train on this rank (args: metrics_file, trace_dir)."""
    ctx = ParallelContext.create(plan, rank)
    check_same_config(cfg, ctx)
    torch.manual_seed(cfg["seed"])
    data = build_data(cfg, ctx)
    model = build_model(cfg, ctx)
    if cfg["load_checkpoint"]:
        model.load_hf(cfg["load_checkpoint"])
    tuning = apply_tuning(model, cfg, ctx)  # LoRA / adapter / side: freezes the rest
    total = cfg["max_steps"] or cfg["num_epochs"] * len(data) // (cfg["batch_size"] * cfg["gradient_accumulation_steps"])
    log = (lambda msg: print(f"[rank {rank}] {msg}", flush=True))
    if rank == 0:
        log(f"plan: {plan.describe()}")
    log(tuning)
    trainer = Trainer(model, ctx, cfg, data, total, log=log)
    if plan.pp_size > 1:
        pipe = trainer.forward_backward = PipelineForwardBackward(trainer)
        if ctx.dp_rank == 0 and ctx.tp_rank == 0:
            actions = pipe.actions(cfg["gradient_accumulation_steps"] * cfg["num_microbatches"])
            log(f"{cfg['pipeline_schedule']} stage {ctx.pp_rank}: {format_actions(actions)}")
    with observe.traced(args.trace_dir, rank, model, lambda: trainer.step + 1) as on_step:
        run_training(trainer, total, args.metrics_file, on_step)
    if cfg["save_dir"]:
        model.save_hf(cfg["save_dir"], cfg["save_trainable_only"])


def main(doc, model, default_config, build_model, build_data, argv=None):
    """Parse the command line (config errors stop here, before any process starts) and train
    `model` ("bert", "llama") on this rank, or on every rank spawned here."""
    args, cfg, plan, world, rank = cli.parse(doc.splitlines()[0], default_config, argv)
    if cfg["model"] != model:
        raise SystemExit(f"galaxy: config {args.config_file} has model '{cfg['model']}', this script trains {model}")
    if args.explain:  # the plan only: no process group, no training
        raise SystemExit(print(explain(plan, cfg, lambda ctx: build_model(cfg, ctx))))
    launch.run(train, world, rank, (cfg, plan, args, build_model, build_data), args.init_method,
               cfg["distributed_backend"], cfg["timeout_s"])
