from galaxy.models import lazy_model
from galaxy.models.llama.config import LlamaConfig

__all__ = ["LlamaConfig", "LlamaModel", "LlamaForCausalLM"]
__getattr__ = lazy_model(__name__, __all__[1:])
