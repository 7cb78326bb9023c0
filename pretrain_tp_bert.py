"""Tensor-parallel BERT (the prototype's pretrain_tp_bert.py): pretrain_galaxy.py with train_config/bert/tp/full.json as the default config.

    python pretrain_tp_bert.py --world 2 --rank 0   (and --rank 1 in a second terminal)
"""
from galaxy.app import train

if __name__ == "__main__":
    train.main(__doc__, "bert", "train_config/bert/tp/full.json")
