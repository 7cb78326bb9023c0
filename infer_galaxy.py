"""Forward-only inference (BERT MLM logits, BART encoder, LLaMA prefill) in any layout; the config says which.

    python infer_galaxy.py --config_file train_config/bert/galaxy/full.json --world 2               # both ranks here
    python infer_galaxy.py --config_file train_config/bert/galaxy/full.json --world 2 --rank 0      # terminal 1
    python infer_galaxy.py --config_file train_config/bert/galaxy/full.json --world 2 --rank 1      # terminal 2
    python infer_galaxy.py --config_file planned.json --world 2 --requests 50 --warmup 5 --seq_length 256
    python infer_galaxy.py --config_file train_config/llama/galaxy/full.json --world 2 --texts prompts.txt
    python infer_galaxy.py --config_file ... --world 2 --load_checkpoint out/bert --batch_size 4

planned.json is what `python -m galaxy.planner --config ... --world 2 --out planned.json` writes.
Rank 0 prints per-request latency percentiles (the slowest rank's time per request) and throughput.
"""
from galaxy.app import infer

if __name__ == "__main__":
    infer.main(__doc__, "train_config/bert/galaxy/full.json")
