from galaxy.models import lazy_model
from galaxy.models.bert.config import BertConfig

__all__ = ["BertConfig", "BertModel", "BertForMaskedLM", "BertForRetrieval", "sentence_embedding"]
__getattr__ = lazy_model(__name__, __all__[1:])
