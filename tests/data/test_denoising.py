"""BART text infilling: span replacement, sample layout, per-index determinism."""
import pytest
import torch

from galaxy.data import BartDenoisingData, infill_spans
from galaxy.seeding import generator

from .conftest import SHIPPED

MASK = 4


def test_infilling_replaces_each_span_by_one_mask_and_keeps_the_rest_in_order():
    ids = torch.arange(10, 110)  # 100 distinct non-special ids
    covered = []
    for seed in range(50):
        out = infill_spans(ids, MASK, generator(seed))
        is_mask = out == MASK
        assert not (is_mask[1:] & is_mask[:-1]).any()  # a run of masked tokens became one [MASK]
        kept = out[~is_mask]
        assert torch.equal(kept, kept.sort().values) and torch.isin(kept, ids).all()  # a subsequence
        covered.append(1 - len(kept) / len(ids))
    assert 0.2 < sum(covered) / len(covered) < 0.35  # about 30% of the tokens are hidden


@pytest.fixture(scope="module")
def data(bert_tok):
    return BartDenoisingData(SHIPPED / "pretrain.jsonl", bert_tok, seq_length=48, seed=3)


def test_samples_frame_target_input_and_shifted_decoder_input(data, bert_tok):
    b = data.get_batch([0, 5, 9])
    assert set(b) == {"input_ids", "attention_mask", "decoder_input_ids", "labels"}
    for v in b.values():
        assert v.shape == (3, 48) and v.dtype == torch.long
    labels, inputs = b["labels"], b["input_ids"]
    assert (labels[:, 0] == bert_tok.cls_id).all() and (labels[:, -1] == bert_tok.sep_id).all()
    assert (b["decoder_input_ids"][:, 0] == bert_tok.sep_id).all()
    assert torch.equal(b["decoder_input_ids"][:, 1:], labels[:, :-1])
    assert torch.equal(b["attention_mask"], (inputs != bert_tok.pad_id).long())
    for row, mask in zip(inputs, b["attention_mask"], strict=True):
        real = row[mask.bool()]
        assert real[0] == bert_tok.cls_id and real[-1] == bert_tok.sep_id and (real == bert_tok.mask_id).any()
        assert mask.sum() < 48  # shorter than the target: spans collapsed, padding follows


def test_sample_is_the_same_whichever_batch_asks(data, bert_tok):
    whole = data.get_batch([4, 7, 1, 2])
    halves = [data.get_batch([4, 7]), data.get_batch([1, 2])]
    for key, value in whole.items():
        assert torch.equal(value, torch.cat([h[key] for h in halves]))
    other_seed = BartDenoisingData(SHIPPED / "pretrain.jsonl", bert_tok, seq_length=48, seed=4).get_batch([4])
    assert torch.equal(other_seed["labels"][0], whole["labels"][0])
    assert not torch.equal(other_seed["input_ids"][0], whole["input_ids"][0])


def test_bad_index_is_an_error(data):
    with pytest.raises(IndexError, match="out of range"):
        data.get_batch([len(data)])
