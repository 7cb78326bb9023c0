"""LLaMA fine-tuning (instructions with the prompt masked, or plain text) in any layout.

    python finetune_llama.py --config train_config/llama/full.json --max_steps 20
    python finetune_llama.py --config train_config/llama/galaxy/full.json --world 2
    python finetune_llama.py --config train_config/llama/full.json --load_checkpoint DIR --save_dir OUT

data "instruction": data_file holds {"input","target"} lines; only target tokens (and </s>) carry loss.
data "corpus": data_file holds {"title","content"} lines, cut into seq_length-token sequences.
"""
from galaxy.data import InstructionData, PretrainTextData
from galaxy.models.llama import LlamaConfig, LlamaForCausalLM
from galaxy.train import entry


def build_data(cfg, ctx):
    tok = entry.load_tokenizer(cfg)
    if cfg["data"] == "instruction":
        plan = ctx.plan  # sequence shards and pipeline stages need every batch at seq_length
        fixed = plan.seq_sharded or plan.pp_size > 1
        return InstructionData(cfg["data_file"], tok, cfg["seq_length"], pad_to_max_length=fixed)
    if cfg["data"] == "corpus":
        return PretrainTextData(cfg["data_file"], tok, cfg["seq_length"])
    raise SystemExit(f"galaxy: data '{cfg['data']}' is not available for LLaMA; use instruction or corpus")


def build_model(cfg, ctx):
    return LlamaForCausalLM(LlamaConfig.from_dict(cfg), ctx)


if __name__ == "__main__":
    entry.main(__doc__, "llama", "train_config/llama/full.json", build_model, build_data)
