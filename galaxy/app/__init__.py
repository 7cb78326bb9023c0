"""The application on top of the engine: what the commands run. train (every training script),
infer (infer_galaxy.py), what their ranks share (session: joining, one config, the model from
the run's sources), the command line (cli) and where a run writes (outputs).
The engine (every other galaxy package) never imports this one."""
