from galaxy.models.llama.config import LlamaConfig
from galaxy.models.llama.model import LlamaForCausalLM, LlamaModel

__all__ = ["LlamaConfig", "LlamaModel", "LlamaForCausalLM"]
