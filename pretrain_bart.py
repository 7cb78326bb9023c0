"""BART denoising (text infilling) pretraining in any layout; the config says which.

    python pretrain_bart.py --config_file train_config/bart/full.json --max_steps 50
    python pretrain_bart.py --config_file train_config/bart/galaxy/full.json --world 2
"""
from galaxy.data import BartDenoisingData
from galaxy.models.bart import BartConfig, BartForConditionalGeneration
from galaxy.train import entry


def build_data(cfg, ctx):
    return BartDenoisingData(cfg["data_file"], entry.load_tokenizer(cfg), cfg["seq_length"], cfg["seed"])


def build_model(cfg, ctx):
    return BartForConditionalGeneration(BartConfig.from_dict(cfg), ctx)


def check_supported(cfg, plan):
    """What BART cannot do here, refused before any process group forms."""
    if cfg["data"] != "corpus":
        raise SystemExit(f"galaxy: config error: BART trains on the corpus (data 'corpus'), config says {cfg['data']!r}")
    if plan.pp_size > 1:
        raise SystemExit("galaxy: config error: stage_num_hidden_layers_list: BART does not support pipeline parallelism")
    if cfg["use_side"] or cfg["use_side_only"]:
        raise SystemExit("galaxy: config error: use_side / use_side_only: side-tuning reads one stack of layers "
                         "(BERT, LLaMA); BART's encoder-decoder is not supported")


if __name__ == "__main__":
    entry.main(__doc__, "bart", "train_config/bart/full.json", build_model, build_data, check=check_supported)
