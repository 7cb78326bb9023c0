"""BART denoising (text infilling) pretraining in any layout; the config says which.

    python pretrain_bart.py --config_file train_config/bart/full.json --max_steps 50
    python pretrain_bart.py --config_file train_config/bart/galaxy/full.json --world 2
"""
from galaxy.app import train

if __name__ == "__main__":
    train.main(__doc__, "bart", "train_config/bart/full.json")
