from galaxy.models.bert.model import BertConfig, BertForMaskedLM, BertForRetrieval, BertModel, sentence_embedding

__all__ = ["BertConfig", "BertModel", "BertForMaskedLM", "BertForRetrieval", "sentence_embedding"]
