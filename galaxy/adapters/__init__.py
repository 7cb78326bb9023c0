from .adapter import Adapter
from .side import SideNetwork
from .utils import make_activation, mark_only_adapters_as_trainable, mark_only_side_as_trainable

__all__ = ["Adapter", "SideNetwork", "make_activation",
           "mark_only_adapters_as_trainable", "mark_only_side_as_trainable"]
