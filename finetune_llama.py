"""LLaMA fine-tuning (instructions with the prompt masked, or plain text) in any layout.

    python finetune_llama.py --config train_config/llama/full.json --max_steps 20
    python finetune_llama.py --config train_config/llama/galaxy/full.json --world 2
    python finetune_llama.py --config train_config/llama/full.json --load_checkpoint DIR --save_dir OUT

data "instruction": data_file holds {"input","target"} lines; only target tokens (and </s>) carry loss.
data "corpus": data_file holds {"title","content"} lines, cut into seq_length-token sequences.
"""
from galaxy.app import train

if __name__ == "__main__":
    train.main(__doc__, "llama", "train_config/llama/full.json")
