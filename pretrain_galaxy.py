"""BERT masked-LM pretraining in any layout; the config says which.

    python pretrain_galaxy.py --config_file train_config/bert/full.json --max_steps 50
    python pretrain_galaxy.py --config_file train_config/bert/galaxy/full.json --world 2 --rank 0   # terminal 1
    python pretrain_galaxy.py --config_file train_config/bert/galaxy/full.json --world 2 --rank 1   # terminal 2
    python pretrain_galaxy.py --config_file train_config/bert/galaxy/full.json --world 2            # both ranks here
    python pretrain_galaxy.py --config_file train_config/bert/galaxy/full.json --world 2 --explain  # the plan only
    python pretrain_galaxy.py --config_file train_config/bert/galaxy/full.json --world 2 --trace_dir traces --max_steps 2
"""
import torch
import torch.distributed as dist

from galaxy.comm import launch
from galaxy.comm.context import ParallelContext
from galaxy.data import BertPretrainData, SyntheticMLM, Tokenizer
from galaxy.explain import explain
from galaxy.models.bert import BertConfig, BertForMaskedLM
from galaxy.models.tuning import apply_tuning
from galaxy.pipeline import PipelineForwardBackward, format_actions
from galaxy.profiler import observe
from galaxy.train import cli
from galaxy.train.config import config_hash
from galaxy.train.loop import Trainer, run_training


def build_data(cfg):
    if cfg["data"] == "synthetic":
        return SyntheticMLM(cfg["vocab_size"], cfg["seq_length"], cfg["seed"])
    tok = Tokenizer(cfg["tokenizer_file"])
    if tok.vocab_size > cfg["vocab_size"]:
        raise SystemExit(f"galaxy: tokenizer {cfg['tokenizer_file']} has {tok.vocab_size} pieces, "
                         f"config vocab_size is {cfg['vocab_size']}")
    return BertPretrainData(cfg["data_file"], tok, cfg["seq_length"], cfg["seed"])


def check_same_config(cfg, ctx):
    """Ranks started with different configs would deadlock or diverge: stop them now."""
    if ctx.world == 1:
        return
    digests = [None] * ctx.world
    dist.all_gather_object(digests, config_hash(cfg))
    if len(set(digests)) > 1:
        raise SystemExit(f"galaxy: ranks were started with different configs (digests {digests})")


def main(rank, world, cfg, plan, args):
    ctx = ParallelContext.create(plan, rank)
    check_same_config(cfg, ctx)
    torch.manual_seed(cfg["seed"])
    data = build_data(cfg)
    model = BertForMaskedLM(BertConfig.from_dict(cfg), ctx)
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


if __name__ == "__main__":
    args, cfg, plan, world, rank = cli.parse(__doc__.splitlines()[0], "train_config/bert/full.json")
    if args.explain:  # the plan only: no process group, no training
        raise SystemExit(print(explain(plan, cfg, lambda ctx: BertForMaskedLM(BertConfig.from_dict(cfg), ctx))))
    launch.run(main, world, rank, (cfg, plan, args), args.init_method, cfg["distributed_backend"], cfg["timeout_s"])
