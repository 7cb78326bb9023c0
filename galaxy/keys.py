"""What a config section is made of. A section is a frozen dataclass (galaxy.config.load lists
them); each field is one config key, with a default and a one-line description (`key`), and the
section's __post_init__ checks its rules with the helpers below, whose messages name the key.
It sits at the bottom of the package picture (it imports only galaxy.errors), so the modules that
own sections (plan.py, data, tuning, the models' config classes) can import it."""
from dataclasses import field, fields

from galaxy.errors import ConfigError


def key(default, doc):
    """A config key: its default and one line saying what it does (a list or dict default is copied
    for every config)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def settle(section, **values):
    """Set values a frozen section derives from its keys (in its __post_init__)."""
    for name, value in values.items():
        object.__setattr__(section, name, value)


def _refuse(section, names, bad, rule):
    """ConfigError for the first of `names` whose value is set and bad(value): it must be `rule`."""
    for name in names:
        value = getattr(section, name)
        if value is not None and bad(value):
            raise ConfigError(f"config key '{name}' must be {rule}, got {value}")


def at_least(section, names, bound):
    _refuse(section, names, lambda value: value < bound, f">= {bound}")


def positive(section, names):
    _refuse(section, names, lambda value: not value > 0, "> 0")


def probability(section, names):
    """Dropout rates and the like: in [0, 1)."""
    _refuse(section, names, lambda value: not 0.0 <= value < 1.0, "in [0, 1)")


def one_of(section, name, allowed):
    value = getattr(section, name)
    if value not in allowed:
        raise ConfigError(f"config key '{name}' is {value!r}, expected one of {[a for a in allowed if a is not None]}")


def check_transformer(model, eps="layer_norm_eps", dropouts=()):
    """The rules every architecture's config follows: positive sizes, a positive norm epsilon and
    initializer range, dropout rates in [0, 1), heads that divide the hidden size."""
    at_least(model, ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size"), 1)
    positive(model, (eps, "initializer_range"))
    probability(model, dropouts)
    if model.hidden_size % model.num_attention_heads:
        raise ConfigError(f"hidden_size {model.hidden_size} is not divisible by num_attention_heads "
                          f"{model.num_attention_heads}")


def from_keys(cls, d):
    """cls built from the entries of mapping `d` that are its fields (None or absent: its default)."""
    return cls(**{f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None})
