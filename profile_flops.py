"""Forward FLOPs, MACs, parameters and latency per module of the serial model a training
config describes, for one forward of batch_size x seq_length tokens (eval mode: no dropout).

    python profile_flops.py --model bert --config train_config/bert/full.json --depth 3
    python profile_flops.py --model bart --config train_config/bart/full.json
    python profile_flops.py --config train_config/bert/full.json --hidden_size 768 --num_hidden_layers 12 \\
        --num_attention_heads 12 --intermediate_size 3072 --vocab_size 30522 --seq_length 128 --batch_size 1

Any config key can be overridden with --key value. Counting conventions: galaxy/profiler/flops.py,
and docs/flops.md for BERT's count by hand.
"""
import argparse

import torch

from galaxy.app.cli import config_overrides
from galaxy.config.load import load_config
from galaxy.errors import ConfigError
from galaxy.models.registry import MODELS, build_model
from galaxy.profiler import get_model_profile


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Any config key can be overridden with --key value.")
    parser.add_argument("--model", choices=sorted(MODELS), default=None, help="default: the config's 'model'")
    parser.add_argument("--config_file", "--config", dest="config_file", default=None,
                        help="default: train_config/<model>/full.json")
    parser.add_argument("--depth", type=int, default=2, help="table depth (root = 0, -1 = every module)")
    args, rest = parser.parse_known_args(argv)
    overrides = {**config_overrides(parser, rest), **({"model": args.model} if args.model else {})}
    try:
        cfg = load_config(args.config_file or f"train_config/{args.model or 'bert'}/full.json", overrides)
    except ConfigError as e:
        parser.exit(2, f"profile_flops: config error: {e}\n")
    name = cfg["model"]
    model = build_model(cfg).eval()
    ids = torch.randint(cfg["vocab_size"], (cfg["batch_size"], cfg["seq_length"]),
                        generator=torch.Generator().manual_seed(cfg["seed"]))
    print(f"{name}: one forward of batch {cfg['batch_size']} x seq {cfg['seq_length']}")
    inputs = {"input_ids": ids}
    if name == "bart":  # encoder-decoder: the decoder reads the same tokens
        inputs["decoder_input_ids"] = ids
    return get_model_profile(model, kwargs=inputs, depth=args.depth)


if __name__ == "__main__":
    main()
