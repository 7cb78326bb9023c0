"""BART denoising data: text infilling (Lewis et al. 2020, section 2.2) on the pretraining corpus.

Sample i is the corpus's i-th chunk of seq_length-2 tokens framed as [CLS] chunk [SEP]: that is
the target the decoder reconstructs. The encoder sees it corrupted: spans of the chunk, their
lengths drawn from Poisson(3) (at least 1; BART's zero-length insertions are left out), are each
replaced by a single [MASK] until about 30% of the chunk's tokens are covered; the shorter result
is padded with [PAD]. The decoder is teacher-forced with the target shifted right behind [SEP]
(BART starts decoding from its end-of-sequence token). Like BertPretrainData, sample i depends
only on (file, tokenizer, seq_length, seed, i).
"""
import torch

from galaxy import seeding

from .pretrain import check_bert_pieces, check_indices, token_chunks


def infill_spans(ids, mask_id, generator, mask_ratio=0.3, poisson_lambda=3.0):
    """ids [n] -> shorter 1-D tensor with spans of ids replaced by one mask_id each.

    Span lengths are drawn until their sum reaches mask_ratio * n; starts are uniform, so
    overlapping spans merge and cover a little less. The draws have fixed shapes, so the
    result depends only on the generator's state and ids."""
    n = len(ids)
    budget = round(mask_ratio * n)
    lengths = torch.poisson(torch.full((budget,), poisson_lambda), generator=generator).long().clamp(min=1)
    lengths = lengths[: int((lengths.cumsum(0) < budget).sum()) + 1] if budget else lengths
    starts = torch.randint(n, (len(lengths),), generator=generator)
    at = torch.arange(n)
    covered = ((at >= starts[:, None]) & (at < (starts + lengths)[:, None])).any(0)  # in any span
    run_start = covered & ~torch.cat([torch.tensor([False]), covered[:-1]])
    return torch.where(covered, mask_id, ids)[~covered | run_start]


class BartDenoisingData:
    """{"title","content"} JSONL -> text-infilling samples of seq_length tokens (see module doc)."""

    def __init__(self, jsonl_path, tokenizer, seq_length, seed, mask_ratio=0.3, poisson_lambda=3.0):
        check_bert_pieces(tokenizer, seq_length, "BART")
        self.tokenizer, self.seq_length, self.seed = tokenizer, seq_length, seed
        self.mask_ratio, self.poisson_lambda = mask_ratio, poisson_lambda
        self._chunks, self.cut = token_chunks(jsonl_path, tokenizer, seq_length - 2)

    def __len__(self):
        return len(self._chunks)

    def sample(self, i):
        """(encoder input, target) of sample i, both [seq_length]."""
        check_indices([i], len(self))
        tok = self.tokenizer
        cls, sep = torch.tensor([tok.cls_id]), torch.tensor([tok.sep_id])
        corrupted = infill_spans(self._chunks[i], tok.mask_id, seeding.generator(self.seed, "span infilling", i),
                                 self.mask_ratio, self.poisson_lambda)
        inputs = torch.full((self.seq_length,), tok.pad_id)
        inputs[:len(corrupted) + 2] = torch.cat([cls, corrupted, sep])
        return inputs, torch.cat([cls, self._chunks[i], sep])

    def get_batch(self, indices):
        """input_ids, attention_mask, decoder_input_ids, labels: [len(indices), seq_length]."""
        inputs, targets = map(torch.stack, zip(*(self.sample(i) for i in indices), strict=True))
        start = torch.full((len(indices), 1), self.tokenizer.sep_id)
        return {"input_ids": inputs,
                "attention_mask": (inputs != self.tokenizer.pad_id).long(),
                "decoder_input_ids": torch.cat([start, targets[:, :-1]], dim=1),
                "labels": targets}
