"""BART denoising (text infilling) pretraining in any layout; the config says which.

    python pretrain_bart.py --config_file train_config/bart/full.json --max_steps 50
    python pretrain_bart.py --config_file train_config/bart/galaxy/full.json --world 2
"""
from galaxy.comm import launch
from galaxy.data import BartDenoisingData
from galaxy.models.bart import BartConfig, BartForConditionalGeneration
from galaxy.train import cli
from pretrain_galaxy import load_tokenizer, main


def build_bart(cfg, ctx):
    data = BartDenoisingData(cfg["data_file"], load_tokenizer(cfg), cfg["seq_length"], cfg["seed"])
    return BartForConditionalGeneration(BartConfig.from_dict(cfg), ctx), data


def check_supported(cfg, plan):
    """What BART cannot do here, refused before any process group forms."""
    problem = None
    if cfg["model"] != "bart":
        problem = f"pretrain_bart.py trains model 'bart', config says {cfg['model']!r}"
    elif cfg["data"] != "corpus":
        problem = f"BART trains on the corpus (data 'corpus'), config says {cfg['data']!r}"
    elif plan.pp_size > 1:
        problem = "stage_num_hidden_layers_list: BART does not support pipeline parallelism"
    if problem:
        raise SystemExit(f"galaxy: config error: {problem}")


if __name__ == "__main__":
    args, cfg, plan, world, rank = cli.parse(__doc__.splitlines()[0], "train_config/bart/full.json")
    check_supported(cfg, plan)
    launch.run(main, world, rank, (cfg, plan, args, build_bart), args.init_method, cfg["distributed_backend"],
               cfg["timeout_s"])
