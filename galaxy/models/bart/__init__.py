from galaxy.models import lazy_model
from galaxy.models.bart.config import BartConfig

__all__ = ["BartConfig", "BartModel", "BartForConditionalGeneration"]
__getattr__ = lazy_model(__name__, __all__[1:])
