from .layers import Linear
from .shard import LoraShard
from .utils import lora_state_dict, mark_only_lora_as_trainable

__all__ = ["Linear", "LoraShard", "mark_only_lora_as_trainable", "lora_state_dict"]
