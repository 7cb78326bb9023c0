"""Tokenizers (SentencePiece, Hugging Face), MLM masking, and the pretraining / instruction datasets.

Every dataset has len(data) and get_batch(indices) -> dict of LongTensors;
batch_indices(step, ...) says which indices make global batch `step`.
"""
from .denoising import BartDenoisingData, infill_spans
from .errors import DataError
from .instruction import InstructionData, PretrainTextData
from .mlm import IGNORE_INDEX, mask_tokens
from .pretrain import BertPretrainData, SyntheticMLM, batch_indices, read_jsonl, text_lines
from .retrieval import RetrievalPairs
from .tokenizer import HFTokenizer, Tokenizer, holds_tokenizer, tokenizer_from, train_sentencepiece

__all__ = ["DataError", "Tokenizer", "HFTokenizer", "tokenizer_from", "holds_tokenizer", "train_sentencepiece", "mask_tokens", "IGNORE_INDEX",
           "read_jsonl", "text_lines", "batch_indices", "BertPretrainData",
           "SyntheticMLM", "RetrievalPairs", "InstructionData", "PretrainTextData", "BartDenoisingData", "infill_spans"]
