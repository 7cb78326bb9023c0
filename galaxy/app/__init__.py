"""The application on top of the engine: what the commands run. train (every training script),
infer (infer_galaxy.py), the command line they share (cli) and where a run writes (outputs).
The engine (every other galaxy package) never imports this one."""
