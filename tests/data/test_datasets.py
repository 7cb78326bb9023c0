import pytest
import torch

from galaxy.data import (IGNORE_INDEX, BertPretrainData, DataError, InstructionData,
                         PretrainTextData, SyntheticMLM, Tokenizer, batch_indices, read_jsonl)

from .conftest import SHIPPED, write_jsonl


@pytest.fixture(scope="module")
def bert_data(bert_tok):
    return BertPretrainData(SHIPPED / "pretrain.jsonl", bert_tok, seq_length=64, seed=3)


def test_bert_samples_shape_and_layout(bert_data, bert_tok):
    batch = bert_data.get_batch([0, 5, 9])
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    for v in batch.values():
        assert v.shape == (3, 64) and v.dtype == torch.long
    ids = batch["input_ids"]
    assert (ids[:, 0] == bert_tok.cls_id).all() and (ids[:, -1] == bert_tok.sep_id).all()
    assert (batch["attention_mask"] == 1).all() and (batch["token_type_ids"] == 0).all()
    assert (batch["labels"][:, [0, -1]] == IGNORE_INDEX).all()
    assert (batch["labels"] != IGNORE_INDEX).any()


@pytest.mark.parametrize("make", [
    lambda tok: BertPretrainData(SHIPPED / "pretrain.jsonl", tok, 64, seed=3),
    lambda tok: SyntheticMLM(vocab_size=500, seq_length=32, seed=3),
])
def test_sample_is_the_same_whichever_batch_asks(make, bert_tok):
    data = make(bert_tok)
    whole = data.get_batch([4, 7, 1, 2])
    halves = [data.get_batch([4, 7]), data.get_batch([1, 2])]  # two data-parallel ranks
    for key, value in whole.items():
        assert torch.equal(value, torch.cat([h[key] for h in halves]))
    again = make(bert_tok).get_batch([7])
    assert torch.equal(again["labels"][0], whole["labels"][1])


def test_batch_indices_epochs_and_resume():
    n, bs = 50, 8  # 6 full batches per epoch, 2 samples dropped
    epoch0 = [batch_indices(s, bs, n, seed=1) for s in range(6)]
    flat = [i for b in epoch0 for i in b]
    assert len(set(flat)) == 48 and all(0 <= i < n for i in flat)
    assert batch_indices(6, bs, n, seed=1) != epoch0[0]            # new epoch, new order
    assert batch_indices(4, bs, n, seed=1) == epoch0[4]            # resume needs only step
    assert batch_indices(0, bs, n, seed=2) != epoch0[0]
    with pytest.raises(ValueError):
        batch_indices(0, 64, n, seed=1)


def test_instruction_prompt_carries_no_loss(tmp_path, llama_tok):
    t = llama_tok
    rows = [{"input": "Question: what is a list?\nAnswer:", "target": "A mutable sequence."},
            {"input": "Q: x\nA:", "target": "y"}]
    data = InstructionData(write_jsonl(tmp_path / "i.jsonl", rows), t, max_seq_length=64)
    prompt = [t.bos_id] + t.encode(rows[0]["input"])
    answer = t.encode(rows[0]["target"]) + [t.eos_id]
    batch = data.get_batch([0, 1])
    length = len(prompt) + len(answer)
    assert batch["input_ids"].shape[1] == length  # padded to the longest
    assert batch["input_ids"][0].tolist() == prompt + answer
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * len(prompt) + answer
    short = 1 + len(t.encode(rows[1]["input"])) + len(t.encode(rows[1]["target"])) + 1
    assert batch["attention_mask"][1].tolist() == [1] * short + [0] * (length - short)
    assert (batch["labels"][1, short:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1, short:] == t.pad_id).all()
    assert data.num_truncated == 0


def test_instruction_truncation_is_counted(tmp_path, llama_tok):
    rows = [{"input": "short", "target": "ok"},
            {"input": "a much longer prompt " * 10, "target": "and a long answer " * 10}]
    data = InstructionData(write_jsonl(tmp_path / "i.jsonl", rows), llama_tok,
                           max_seq_length=16, pad_to_max_length=True)
    assert data.num_truncated == 1
    batch = data.get_batch([0, 1])
    assert batch["input_ids"].shape == (2, 16)
    assert (batch["attention_mask"][1] == 1).all()


def test_shipped_instructions_report_what_seq_length_cuts():
    data = InstructionData(SHIPPED / "instructions.jsonl", Tokenizer(SHIPPED / "spm_llama.model"), max_seq_length=64)
    assert data.cut.endswith("instructions.jsonl: 318 of 593 samples are longer than seq_length 64 and were cut, "
                             "4749 of 39123 tokens dropped; 0 sample(s) keep no label token (the prompt fills "
                             "seq_length)"), data.cut


def test_a_prompt_that_fills_seq_length_is_reported(tmp_path, llama_tok):
    rows = [{"input": "a much longer prompt " * 10, "target": "answer"}, {"input": "short", "target": "ok"}]
    data = InstructionData(write_jsonl(tmp_path / "i.jsonl", rows), llama_tok, max_seq_length=16)
    assert "1 of 2 samples are longer than seq_length 16" in data.cut and "1 sample(s) keep no label token" in data.cut


def test_corpus_tails_left_out_are_reported(bert_tok):
    data = BertPretrainData(SHIPPED / "pretrain.jsonl", bert_tok, seq_length=64, seed=3)
    total = sum(len(bert_tok.encode(r["title"])) + len(bert_tok.encode(r["content"]))
                for r in read_jsonl(SHIPPED / "pretrain.jsonl", ("title", "content")))
    left_out = total - len(data) * 62
    assert 0 < left_out < 62 and f"last {left_out} of {total} tokens (less than one sequence of 62)" in data.cut


def test_malformed_line_names_file_and_line(tmp_path, llama_tok):
    path = tmp_path / "i.jsonl"
    path.write_text('{"input": "a", "target": "b"}\n{"input": "a"}\n')
    with pytest.raises(DataError, match=r"i\.jsonl:2: missing key 'target'"):
        InstructionData(path, llama_tok, 32)


def test_pretrain_text_sequences(tmp_path, llama_tok):
    rows = [{"title": f"Title {i}", "content": "Python is a programming language. " * 5}
            for i in range(10)]
    data = PretrainTextData(write_jsonl(tmp_path / "p.jsonl", rows), llama_tok, seq_length=32)
    batch = data.get_batch([0, len(data) - 1])
    assert batch["input_ids"].shape == (2, 32)
    assert batch["input_ids"][0, 0] == llama_tok.bos_id
    assert torch.equal(batch["labels"], batch["input_ids"])
    with pytest.raises(DataError, match="too few"):
        PretrainTextData(tmp_path / "p.jsonl", llama_tok, seq_length=10_000)
