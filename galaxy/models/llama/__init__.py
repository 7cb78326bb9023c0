from galaxy.models.llama.model import LlamaConfig, LlamaForCausalLM, LlamaModel

__all__ = ["LlamaConfig", "LlamaModel", "LlamaForCausalLM"]
