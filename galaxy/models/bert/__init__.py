from galaxy.models.bert.model import BertConfig, BertForMaskedLM, BertModel

__all__ = ["BertConfig", "BertModel", "BertForMaskedLM"]
