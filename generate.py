"""Greedy text generation from a LLaMA checkpoint, in the layout the config names (serial, TP, Galaxy, SP, pipeline).

    python generate.py --checkpoint out/llama_tiny --prompt "Question: What is a list?\\nAnswer:"
    python generate.py --checkpoint out/llama_tiny --prompt "..." --world 2          # TP, heads split evenly
    python generate.py --checkpoint out/llama_tiny --prompt "..." --world 3 --tp_num_attention_heads_list [4,2,2]
    python generate.py --checkpoint out/llama_tiny --prompt "..." --world 2 --config_file train_config/llama/galaxy/full.json
    python generate.py --checkpoint out/llama_tiny --prompt "..." --world 2 --config_file train_config/llama/sp/full.json \\
        --seq_scatter_list [96,32]                   # rank 0 keeps 3 of every 4 positions
    python generate.py --checkpoint out/llama_tiny --prompt "..." --world 2 --config_file train_config/llama/pp/full.json \\
        --stage_num_hidden_layers_list [3,1]

The checkpoint is a Hugging Face LLaMA directory (config.json + safetensors), e.g. what
finetune_llama.py --save_dir writes; its shape wins over the config's model part, and the config
gives the layout (the default config: TP at any --world above 1). The tokenizer is --tokenizer_file,
else the checkpoint's own (tokenizer.json, tokenizer.model), else the config's. Sequence-parallel
layouts read seq_scatter_list as each rank's share of the positions (even without it; seq_length is
not used): the prompt is split in proportion, and each new token goes to the rank furthest below its share.
"\\n" in the prompt stands for a newline. A LoRA / adapter fine-tune saved with
--save_trainable_only true is its base checkpoint plus that directory:

    python generate.py --checkpoint out/base --load_trainable out/lora --prompt "..."
"""
from pathlib import Path

import torch

from galaxy.app import cli
from galaxy.app.session import join, load_model
from galaxy.config.load import is_config_key, read_config
from galaxy.data import holds_tokenizer
from galaxy.data.build import load_tokenizer
from galaxy.errors import ConfigError
from galaxy.inference.generate import greedy_generate
from galaxy.models.checkpoint import CheckpointError
from galaxy.models.llama import LlamaConfig
from galaxy.runtime import launch
from galaxy.tuning.keys import TUNING_FILE, read_tuning_record

DEFAULT_CONFIG = "train_config/llama/tp/full.json"


def add_args(parser):
    group = parser.add_argument_group("generation")
    group.add_argument("--checkpoint", required=True, help="Hugging Face LLaMA directory")
    group.add_argument("--load_trainable", default=None,
                       help="a finetune_llama.py --save_trainable_only directory (LoRA / adapter) applied to --checkpoint")
    group.add_argument("--prompt", required=True, help="the text to continue")
    group.add_argument("--max_new_tokens", type=int, default=64, help="tokens to generate at most")
    group.add_argument("--ignore_eos", action="store_true", help="keep going after </s>")


def generation_keys(args, overrides):
    """The config keys --checkpoint and --load_trainable bring (the checkpoint's shape and the
    directory to load, the fine-tune's directory and tuning method), and a seq_length that makes
    seq_scatter_list, the ranks' shares of the positions, whole (generation has no fixed length)."""
    config = Path(args.checkpoint) / "config.json"
    if not config.is_file():
        raise ConfigError(f"{config} not found (--checkpoint must be a Hugging Face LLaMA directory)")
    # the model's own fields, not config.json's raw keys: transformers' "dtype" is not the engine's
    shape = {k: v for k, v in vars(LlamaConfig.from_pretrained(args.checkpoint)).items() if is_config_key(k) and v is not None}
    shares = overrides.get("seq_scatter_list") or read_config(args.config_file).get("seq_scatter_list")
    seq_length = sum(shares) if shares else launch.resolve_world_rank(args)[0]  # no list: even shares
    keys = {**shape, **_tuning(args.load_trainable), "model": "llama", "load_checkpoint": args.checkpoint,
            "seq_length": seq_length}
    if holds_tokenizer(args.checkpoint):  # it brings its tokenizer: the config's yields, --tokenizer_file does not
        keys["tokenizer_file"] = None
    return keys


def _tuning(directory):
    """The config keys that rebuild a trainable-only checkpoint's tuning method (its tuning.json)."""
    if directory is None:
        return {}
    saved = read_tuning_record(directory)
    if saved is None:
        raise ConfigError(f"--load_trainable {directory}: no {TUNING_FILE} (it is written by --save_trainable_only true)")
    return {**{k: v for k, v in saved.items() if k != "method"}, saved["method"]: True, "load_trainable": directory}


def check_prompt(args, cfg, plan):
    """[bos] + the prompt's tokens (args.prompt_ids), if they and the new tokens fit the model's positions."""
    training_only = [flag for flag in ("explain", "trace_dir", "metrics_file") if getattr(args, flag)]
    if training_only:
        raise ConfigError(f"--{training_only[0]} records training steps; generate.py has none")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    tok = load_tokenizer(cfg)
    ids = ([] if tok.bos_id is None else [tok.bos_id]) + tok.encode(args.prompt.replace("\\n", "\n"))
    if len(ids) + args.max_new_tokens > cfg["max_position_embeddings"]:
        raise ConfigError(f"--prompt ({len(ids)} tokens with <s>) + --max_new_tokens {args.max_new_tokens} "
                          f"exceeds the checkpoint's max_position_embeddings {cfg['max_position_embeddings']}")
    args.prompt_ids = ids


def parse(argv=None):
    return cli.parse(__doc__.splitlines()[0], DEFAULT_CONFIG, argv, add_args, generation_keys, check_prompt)


def main(rank, world, args, cfg, plan):
    """Generate on this rank; rank 0 prints the text and the new tokens, which every rank returns."""
    ctx = join(cfg, plan, rank)
    try:
        model, _ = load_model(cfg, ctx, rank)
    except CheckpointError as e:
        raise SystemExit(f"galaxy: rank {rank}: {e}") from None
    tok = load_tokenizer(cfg)
    prompt = args.prompt_ids
    out = greedy_generate(model, torch.tensor([prompt]), args.max_new_tokens, None if args.ignore_eos else tok.eos_id)
    new = out[0, len(prompt):].tolist()
    if rank == 0:
        print(f"{tok.decode(new)}\n[{len(new)} new tokens: {new}]", flush=True)
    return new


if __name__ == "__main__":
    args, cfg, plan, world, rank = parse()
    launch.run(main, world, rank, (args, cfg, plan), args.init_method, cfg["distributed_backend"], cfg["timeout_s"],
               args.threads, args.debug)
