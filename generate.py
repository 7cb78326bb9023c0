"""Greedy text generation from a LLaMA checkpoint, serial or tensor-parallel.

    python generate.py --checkpoint out/llama_tiny --prompt "Question: What is a list?\\nAnswer:"
    python generate.py --checkpoint out/llama_tiny --prompt "..." --world 2          # TP, heads split evenly
    python generate.py --checkpoint out/llama_tiny --prompt "..." --world 3 --tp_num_attention_heads_list [4,2,2]

The checkpoint is a Hugging Face LLaMA directory (config.json + safetensors), e.g. what
finetune_llama.py --save_dir writes. "\\n" in the prompt stands for a newline. A LoRA / adapter
fine-tune saved with --save_trainable_only true is its base checkpoint plus that directory:

    python generate.py --checkpoint out/base --load_trainable out/lora --prompt "..."
"""
import argparse
import json
from pathlib import Path

import torch

from galaxy.comm.context import ParallelContext
from galaxy.config.load import is_config_key, load_config
from galaxy.data import Tokenizer
from galaxy.errors import ConfigError
from galaxy.models.checkpoint import CheckpointError
from galaxy.models.llama import LlamaConfig, LlamaForCausalLM
from galaxy.models.llama.generate import check_can_generate, greedy_generate
from galaxy.plan import build_plan
from galaxy.runtime import launch
from galaxy.tuning.apply import apply_tuning
from galaxy.tuning.keys import TUNING_FILE, read_tuning_record


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="Hugging Face LLaMA directory")
    parser.add_argument("--load_trainable", default=None,
                        help="a finetune_llama.py --save_trainable_only directory (LoRA / adapter) applied to --checkpoint")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--tokenizer_file", default="data/python_docs/spm_llama.model")
    parser.add_argument("--ignore_eos", action="store_true", help="keep going after </s>")
    parser.add_argument("--tp_num_attention_heads_list", type=json.loads, default=None, help="e.g. [4,2,2]")
    parser.add_argument("--tp_intermediate_size_list", type=json.loads, default=None, help="e.g. [344,172,172]")
    launch.add_launch_args(parser)
    args = parser.parse_args(argv)
    config = Path(args.checkpoint) / "config.json"
    if not config.is_file():
        parser.exit(2, f"galaxy: {config} not found (--checkpoint must be a Hugging Face LLaMA directory)\n")
    world, rank = launch.resolve_world_rank(args)
    layout = {"parallel": "tp" if world > 1 else "serial",
              "tp_num_attention_heads_list": args.tp_num_attention_heads_list,
              "tp_intermediate_size_list": args.tp_intermediate_size_list}
    try:
        # the model's own fields, not config.json's raw keys: transformers' "dtype" is not the engine's
        model = LlamaConfig.from_pretrained(args.checkpoint)
        shape = {k: v for k, v in vars(model).items() if is_config_key(k) and v is not None}
        tuning = _tuning(args.load_trainable)
        cfg = load_config(None, {**shape, **layout, **tuning, "model": "llama", "seq_length": 1})
        plan = build_plan(cfg, world)
        check_can_generate(plan)
        args.prompt_ids = _prompt_ids(args, model.position_limit)
    except (ConfigError, ValueError) as e:
        parser.exit(2, f"galaxy: config error: {e}\n")
    return args, cfg, plan, world, rank


def _prompt_ids(args, positions):
    """[bos] + the prompt's tokens, if they and the new tokens fit the model's positions."""
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    tok = Tokenizer(args.tokenizer_file)
    ids = [tok.bos_id] + tok.encode(args.prompt.replace("\\n", "\n"))
    if len(ids) + args.max_new_tokens > positions:
        raise ConfigError(f"--prompt ({len(ids)} tokens with <s>) + --max_new_tokens {args.max_new_tokens} "
                          f"exceeds the checkpoint's max_position_embeddings {positions}")
    return ids


def _tuning(directory):
    """The config keys that rebuild a trainable-only checkpoint's tuning method (its tuning.json)."""
    if directory is None:
        return {}
    saved = read_tuning_record(directory)
    if saved is None:
        raise ConfigError(f"--load_trainable {directory}: no {TUNING_FILE} (it is written by --save_trainable_only true)")
    return {**{k: v for k, v in saved.items() if k != "method"}, saved["method"]: True}


def main(rank, world, args, cfg, plan):
    ctx = ParallelContext.create(plan, rank, backend=args.backend or launch.default_backend())
    model = LlamaForCausalLM.from_pretrained(args.checkpoint, ctx)
    if args.load_trainable:
        apply_tuning(model, cfg, ctx)
        try:
            model.load_hf(args.load_trainable, trainable_only=True)
        except CheckpointError as e:
            raise SystemExit(f"galaxy: rank {rank}: {e}") from None
    tok = Tokenizer(args.tokenizer_file)
    prompt = args.prompt_ids
    out = greedy_generate(model, torch.tensor([prompt], device=ctx.device), args.max_new_tokens, None if args.ignore_eos else tok.eos_id)
    new = out[0, len(prompt):].tolist()
    if rank == 0:
        print(f"{tok.decode(new)}\n[{len(new)} new tokens: {new}]", flush=True)


if __name__ == "__main__":
    args, cfg, plan, world, rank = parse()
    init_method = launch.init_method_from(args, local_spawn=rank is None and world > 1)
    launch.run(main, world, rank, (args, cfg, plan), init_method, args.backend, threads=args.threads, debug=args.debug)
