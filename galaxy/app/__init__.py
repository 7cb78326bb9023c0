"""The application on top of the engine: what the commands run.

    train      every training script (pretrain_*.py, finetune_*.py)
    infer      infer_galaxy.py
    answers    what inference answers (embeddings, fill-mask, generation), as JSON
    serve      infer_galaxy.py --serve: HTTP answered by rank 0
    planner    python -m galaxy.planner
    memory     python -m galaxy.memory
    session    what the ranks of every entry share: joining, one config, the model from the run's sources
    cli        the command line they share: config file, launch flags, --key value overrides
    outputs    where a run writes (save_dir, the metrics file), checked and locked before step 1

The engine (every other galaxy package) never imports this one (tests/test_layering.py)."""
