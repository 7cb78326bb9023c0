"""BERT masked-LM pretraining in any layout; the config says which.

    python pretrain_galaxy.py --config_file train_config/bert/full.json --max_steps 50
    python pretrain_galaxy.py --config_file train_config/bert/galaxy/full.json --world 2 --rank 0   # terminal 1
    python pretrain_galaxy.py --config_file train_config/bert/galaxy/full.json --world 2 --rank 1   # terminal 2
    python pretrain_galaxy.py --config_file train_config/bert/galaxy/full.json --world 2            # both ranks here
"""
import torch
import torch.distributed as dist

from galaxy.comm import launch
from galaxy.comm.context import ParallelContext
from galaxy.data import BertPretrainData, SyntheticMLM, Tokenizer
from galaxy.models.bert import BertConfig, BertForMaskedLM
from galaxy.train import cli
from galaxy.train.config import config_hash
from galaxy.train.loop import Trainer, run_training


def load_tokenizer(cfg):
    tok = Tokenizer(cfg["tokenizer_file"])
    if tok.vocab_size > cfg["vocab_size"]:
        raise SystemExit(f"galaxy: tokenizer {cfg['tokenizer_file']} has {tok.vocab_size} pieces, "
                         f"config vocab_size is {cfg['vocab_size']}")
    return tok


def build_data(cfg):
    if cfg["data"] == "synthetic":
        return SyntheticMLM(cfg["vocab_size"], cfg["seq_length"], cfg["seed"])
    return BertPretrainData(cfg["data_file"], load_tokenizer(cfg), cfg["seq_length"], cfg["seed"])


def check_same_config(cfg, ctx):
    """Ranks started with different configs would deadlock or diverge: stop them now."""
    if ctx.world == 1:
        return
    digests = [None] * ctx.world
    dist.all_gather_object(digests, config_hash(cfg))
    if len(set(digests)) > 1:
        raise SystemExit(f"galaxy: ranks were started with different configs (digests {digests})")


def build_bert(cfg, ctx):
    return BertForMaskedLM(BertConfig.from_dict(cfg), ctx), build_data(cfg)


def main(rank, world, cfg, plan, args, build=build_bert):
    """Train on this rank; build(cfg, ctx) -> (model, data) picks the architecture."""
    ctx = ParallelContext.create(plan, rank)
    check_same_config(cfg, ctx)
    torch.manual_seed(cfg["seed"])
    model, data = build(cfg, ctx)
    if cfg["load_checkpoint"]:
        model.load_hf(cfg["load_checkpoint"])
    total = cfg["max_steps"] or cfg["num_epochs"] * len(data) // (cfg["batch_size"] * cfg["gradient_accumulation_steps"])
    log = (lambda msg: print(f"[rank {rank}] {msg}", flush=True))
    if rank == 0:
        log(f"plan: {plan.describe()}")
    trainer = Trainer(model, ctx, cfg, data, total, log=log)
    run_training(trainer, total, args.metrics_file)
    if cfg["save_dir"]:
        model.save_hf(cfg["save_dir"])


if __name__ == "__main__":
    args, cfg, plan, world, rank = cli.parse(__doc__.splitlines()[0], "train_config/bert/full.json")
    launch.run(main, world, rank, (cfg, plan, args), args.init_method, cfg["distributed_backend"], cfg["timeout_s"])
