from .layers import Embedding, Linear, LoRALayer, MergedLinear
from .shard import LoraShard
from .utils import lora_state_dict, mark_only_lora_as_trainable

__all__ = ["LoRALayer", "Linear", "Embedding", "MergedLinear", "LoraShard",
           "mark_only_lora_as_trainable", "lora_state_dict"]
