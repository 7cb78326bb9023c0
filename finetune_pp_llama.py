"""Pipeline-parallel LLaMA fine-tuning (the prototype's finetune_pp_llama.py): finetune_llama.py with
train_config/llama/pp/full.json as the default config.

    python finetune_pp_llama.py --rank 0 --world 2 --config train_config/llama/pp/full.json
"""
from galaxy.app import train

if __name__ == "__main__":
    train.main(__doc__, "llama", "train_config/llama/pp/full.json")
