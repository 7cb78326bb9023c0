"""Causal-LM data: instruction tuning with prompt masking, and plain pretraining.

Labels are aligned with input_ids (label[t] is the id at position t); the model
shifts them by one when computing the next-token loss, as Hugging Face models do.
"""
import torch

from .mlm import IGNORE_INDEX
from .pretrain import check_indices, read_jsonl, token_chunks
from .tokenizer import padded


class InstructionData:
    """{"input","target"} JSONL -> [bos] + input + target + [eos], prompt masked.

    Labels are IGNORE_INDEX on [bos] + input, so only target tokens and [eos]
    carry loss. Samples longer than max_seq_length keep their first
    max_seq_length tokens; `cut` says how many samples and tokens that dropped, and
    how many samples are left with no label token (their prompt alone fills
    max_seq_length).

    get_batch right-pads to the longest sample in the batch, or always to
    max_seq_length with pad_to_max_length=True (fixed shapes, as sequence or
    pipeline splits need). Padding uses pad_id (eos_id if the model has none),
    attention_mask 0 and label IGNORE_INDEX.
    """

    def __init__(self, jsonl_path, tokenizer, max_seq_length, pad_to_max_length=False):
        if tokenizer.bos_id is None or tokenizer.eos_id is None:
            raise ValueError(f"tokenizer {tokenizer.model_file} needs bos and eos pieces")
        self.max_seq_length, self.pad_to_max_length = max_seq_length, pad_to_max_length
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        self._samples = []  # (input_ids, labels) as lists
        self.num_truncated = tokens = tokens_cut = 0
        for row in read_jsonl(jsonl_path, ("input", "target")):
            prompt = [tokenizer.bos_id] + tokenizer.encode(row["input"])
            answer = tokenizer.encode(row["target"]) + [tokenizer.eos_id]
            ids, labels = prompt + answer, [IGNORE_INDEX] * len(prompt) + answer
            tokens, cut = tokens + len(ids), max(0, len(ids) - max_seq_length)
            self.num_truncated, tokens_cut = self.num_truncated + (cut > 0), tokens_cut + cut
            self._samples.append((ids[:max_seq_length], labels[:max_seq_length]))
        unlabelled = sum(all(x == IGNORE_INDEX for x in lab) for _, lab in self._samples)
        self.cut = (f"{jsonl_path}: {self.num_truncated} of {len(self)} samples are longer than seq_length "
                    f"{max_seq_length} and were cut, {tokens_cut} of {tokens} tokens dropped; {unlabelled} "
                    f"sample(s) keep no label token (the prompt fills seq_length)") if self.num_truncated else ""

    def __len__(self):
        return len(self._samples)

    def get_batch(self, indices):
        """input_ids, attention_mask, labels: [len(indices), padded length] long."""
        check_indices(indices, len(self))
        rows = [self._samples[i] for i in indices]
        length = self.max_seq_length if self.pad_to_max_length else max(len(r[0]) for r in rows)
        return {"input_ids": padded([ids for ids, _ in rows], length, self.pad_id),
                "attention_mask": padded([[1] * len(ids) for ids, _ in rows], length, 0),
                "labels": padded([labels for _, labels in rows], length, IGNORE_INDEX)}


class PretrainTextData:
    """{"title","content"} JSONL -> fixed-length causal-LM sequences.

    Each document becomes [bos] + title + content + [eos] (bos/eos left out if
    the tokenizer lacks them); documents are concatenated and cut into len(self)
    sequences of seq_length, dropping the tail (`cut` says how much). labels == input_ids.
    """

    def __init__(self, jsonl_path, tokenizer, seq_length):
        ends = [[i] if i is not None else [] for i in (tokenizer.bos_id, tokenizer.eos_id)]
        self.seq_length = seq_length
        self._seqs, self.cut = token_chunks(jsonl_path, tokenizer, seq_length, ends, framed=0)

    def __len__(self):
        return len(self._seqs)

    def get_batch(self, indices):
        """input_ids, attention_mask (all 1), labels: [len(indices), seq_length] long."""
        check_indices(indices, len(self))
        input_ids = self._seqs[list(indices)]
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}
