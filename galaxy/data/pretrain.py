"""BERT pretraining data: JSONL reading, fixed-length MLM samples, batch order.

Determinism contract (data-parallel ranks and the serial run must see identical
samples): sample i is a pure function of (file, tokenizer, seq_length, seed, i),
its masking uses a generator seeded from (seed, i) alone, and the indices of
global batch `step` are a pure function of (step, batch_size, num_samples, seed).
A rank takes its slice of batch_indices(...) and calls get_batch on it; resuming
needs only the step number.
"""
import json
from pathlib import Path

import torch

from galaxy.seeding import generator

from .errors import DataError
from .mlm import mask_tokens

# Id layout of the BERT tokenizer (kind="bert"); SyntheticMLM uses it as well.
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(5)


def text_lines(path):
    """(line number, text) of each line of a UTF-8 text file; DataError "<path>: cannot read (why)"
    or "<path>:<line>: not valid UTF-8 (byte N)"."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    for lineno, line in enumerate(raw.splitlines(), start=1):
        try:
            yield lineno, line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start + 1})") from None


def read_jsonl(path, required_keys):
    """Objects of a JSONL file, each with string values for required_keys.

    Blank lines are skipped. Any defect raises DataError "<path>:<line>: why".
    """
    rows = []
    for lineno, text in text_lines(path):
        where = f"{path}:{lineno}"
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for key in required_keys:
            if key not in row:
                raise DataError(f"{where}: missing key {key!r}")
            if not isinstance(row[key], str):
                raise DataError(f"{where}: key {key!r} must be a string, got {type(row[key]).__name__}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: empty file, expected one JSON object per line")
    return rows


def batch_indices(step, batch_size, num_samples, seed):
    """Sample indices of global batch number `step` (0-based).

    Each epoch is a fresh permutation seeded from (seed, epoch), cut into
    num_samples // batch_size full batches; the incomplete tail is dropped so
    every batch splits evenly across data-parallel ranks.
    """
    steps_per_epoch = num_samples // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {num_samples} samples")
    epoch, b = divmod(step, steps_per_epoch)
    order = torch.randperm(num_samples, generator=generator(seed, "data order", epoch))
    return order[b * batch_size:(b + 1) * batch_size].tolist()


def check_indices(indices, n):
    for i in indices:
        if not 0 <= i < n:
            raise IndexError(f"sample index {i} out of range for {n} samples")


def token_chunks(jsonl_path, tokenizer, body, ends=((), ()), framed=2):
    """{"title","content"} JSONL -> ([n, body] LongTensor, what was cut): all documents (ends[0]'s ids,
    title tokens, content tokens, ends[1]'s ids) concatenated into one stream, cut into consecutive chunks;
    the tail is dropped. `framed`: the tokens each chunk is framed with (BERT's [CLS] ... [SEP]: 2)."""
    before, after = map(list, ends)
    stream = [t for row in read_jsonl(jsonl_path, ("title", "content"))
              for t in before + tokenizer.encode(row["title"]) + tokenizer.encode(row["content"]) + after]
    n, left = divmod(len(stream), body)
    if n == 0:
        raise DataError(f"{jsonl_path}: {len(stream)} tokens, too few for one sequence of length {body + framed}")
    chunks = torch.tensor(stream[:n * body], dtype=torch.long).view(n, body)
    return chunks, (f"{jsonl_path}: the corpus's last {left} of {len(stream)} tokens (less than one sequence of "
                    f"{body}) are left out") if left else ""  # for the start-up report ("" if nothing was cut)


class _MLMBatches:
    """get_batch of a dataset whose masked(i) is sample i's (inputs, labels), all of one length."""

    def get_batch(self, indices):
        """input_ids, attention_mask, token_type_ids, labels: [len(indices), seq_length]."""
        check_indices(indices, len(self))
        samples = [self.masked(i) for i in indices]
        inputs = torch.stack([s[0] for s in samples])
        return {"input_ids": inputs,
                "attention_mask": torch.ones_like(inputs),
                "token_type_ids": torch.zeros_like(inputs),
                "labels": torch.stack([s[1] for s in samples])}


def check_bert_pieces(tokenizer, seq_length, model):
    """[CLS] ... [SEP] samples need BERT's special pieces and room for one token between them."""
    for name in ("pad_id", "cls_id", "sep_id", "mask_id"):
        if getattr(tokenizer, name) is None:
            raise ValueError(f"tokenizer {tokenizer.model_file} has no {name} "
                             f"({model} data needs a kind='bert' tokenizer)")
    if seq_length < 3:
        raise ValueError(f"seq_length must be >= 3, got {seq_length}")


class BertPretrainData(_MLMBatches):
    """{"title","content"} JSONL -> [CLS] + seq_length-2 tokens + [SEP] MLM samples.

    The samples are the corpus's token_chunks of seq_length-2 tokens (`cut`: the tail left out).
    """

    def __init__(self, jsonl_path, tokenizer, seq_length, seed, mlm_probability=0.15):
        check_bert_pieces(tokenizer, seq_length, "BERT")
        self.tokenizer, self.seq_length, self.seed = tokenizer, seq_length, seed
        self.mlm_probability = mlm_probability
        self._chunks, self.cut = token_chunks(jsonl_path, tokenizer, seq_length - 2)

    def __len__(self):
        return len(self._chunks)

    def masked(self, i):
        tok = self.tokenizer
        ids = torch.cat([torch.tensor([tok.cls_id]), self._chunks[i], torch.tensor([tok.sep_id])])
        return mask_tokens(ids, vocab_size=tok.vocab_size, mask_id=tok.mask_id, special_ids=tok.special_ids,
                           mlm_probability=self.mlm_probability, generator=generator(self.seed, "mlm masking", i))


class SyntheticMLM(_MLMBatches):
    """Random-token MLM samples in the BERT id layout, for benchmarks.

    Sample i is [CLS] + uniform non-special tokens + [SEP], masked like
    BertPretrainData; everything is drawn from a generator seeded from (seed, i).
    """

    def __init__(self, vocab_size, seq_length, seed, num_samples=10_000, mlm_probability=0.15):
        if vocab_size <= MASK_ID + 1:
            raise ValueError(f"vocab_size must exceed the {MASK_ID + 1} special ids")
        self.vocab_size, self.seq_length, self.seed = vocab_size, seq_length, seed
        self.num_samples, self.mlm_probability = num_samples, mlm_probability

    def __len__(self):
        return self.num_samples

    def masked(self, i):
        gen = generator(self.seed, "synthetic sample", i)
        body = torch.randint(MASK_ID + 1, self.vocab_size, (self.seq_length - 2,), generator=gen)
        ids = torch.cat([torch.tensor([CLS_ID]), body, torch.tensor([SEP_ID])])
        return mask_tokens(ids, vocab_size=self.vocab_size, mask_id=MASK_ID, special_ids=range(MASK_ID + 1),
                           generator=gen, mlm_probability=self.mlm_probability)
