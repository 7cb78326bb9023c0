"""BERT masked-LM pretraining in any layout; the config says which (default: the Galaxy layout).

    python pretrain_galaxy.py --config_file train_config/bert/full.json --max_steps 50
    python pretrain_galaxy.py --config_file train_config/bert/galaxy/full.json --world 2 --rank 0   # terminal 1
    python pretrain_galaxy.py --config_file train_config/bert/galaxy/full.json --world 2 --rank 1   # terminal 2
    python pretrain_galaxy.py --config_file train_config/bert/galaxy/full.json --world 2            # both ranks here
    python pretrain_galaxy.py --config_file train_config/bert/galaxy/full.json --world 2 --explain  # the plan only
    python pretrain_galaxy.py --config_file train_config/bert/galaxy/full.json --world 2 --trace_dir traces --max_steps 2
"""
from galaxy.app import train

if __name__ == "__main__":
    train.main(__doc__, "bert", "train_config/bert/galaxy/full.json")
