"""One package per architecture (bert/, llama/, bart/): its config class (config.py, light) and its
model (model.py, torch). A package imports its model on first use, so reading a config
(galaxy.config.load) imports no model code."""
import importlib


def lazy_model(package, names):
    """A package's module __getattr__: `names` come from its model.py when first asked for."""
    def __getattr__(name):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.model"), name)
    return __getattr__
