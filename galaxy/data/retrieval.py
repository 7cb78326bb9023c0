"""Retrieval pairs: a question and the passage that answers it, for training sentence embeddings
with in-batch negatives (each question's own passage against the other passages of its batch).

The pairs are the {"input", "target"} lines of an instruction file (the shipped
data/python_docs/instructions.jsonl: "What does the section 'X' of ... explain?" -> the section's
first sentences). Every HELD_OUT-th pair (index % HELD_OUT == HELD_OUT - 1) is held out for
evaluation and never trained on, so recall on them measures what the model learnt, not what it saw.
"""
import torch

from .pretrain import check_indices, read_jsonl

HELD_OUT = 5


class RetrievalPairs:
    """The training or held-out pairs of `jsonl_path`, tokenized with their special tokens and padded
    to seq_length (sequence-parallel splits need every batch at seq_length)."""

    def __init__(self, jsonl_path, tokenizer, seq_length, held_out=False):
        rows = read_jsonl(jsonl_path, ("input", "target"))
        rows = [r for i, r in enumerate(rows) if (i % HELD_OUT == HELD_OUT - 1) == held_out]
        self.queries = [r["input"] for r in rows]
        self.passages = [r["target"] for r in rows]
        self.tokenizer, self.seq_length = tokenizer, seq_length

    def __len__(self):
        return len(self.queries)

    def encode(self, texts):
        """(input_ids, attention_mask) [len(texts), seq_length]."""
        return self.tokenizer.encode_batch(texts, self.seq_length, pad_to_max_length=True)

    def get_batch(self, indices):
        """Questions and their passages; labels[i] = i, the passage of question i among the batch's."""
        check_indices(indices, len(self))
        query_ids, query_mask = self.encode([self.queries[i] for i in indices])
        passage_ids, passage_mask = self.encode([self.passages[i] for i in indices])
        return {"query_ids": query_ids, "query_mask": query_mask, "passage_ids": passage_ids,
                "passage_mask": passage_mask, "labels": torch.arange(len(indices))}
