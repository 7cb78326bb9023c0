import pytest

from galaxy.data import DataError, Tokenizer, train_sentencepiece


def test_shipped_model_ids_and_round_trip(bert_tok):
    t = bert_tok
    assert t.vocab_size == 8000
    assert (t.pad_id, t.unk_id, t.cls_id, t.sep_id, t.mask_id) == (0, 1, 2, 3, 4)
    assert t.special_ids == [0, 1, 2, 3, 4]
    text = "The for statement iterates over the items of any sequence."
    ids = t.encode(text)
    assert ids and min(ids) > 4
    assert t.decode(ids) == text
    assert t.encode("a [MASK] b").count(t.mask_id) == 1
    assert t.decode([t.cls_id, *ids, t.sep_id, t.pad_id]) == text  # control pieces vanish


def test_tiny_llama_training(llama_tok, tmp_path):
    t = llama_tok
    assert t.vocab_size == 300
    assert (t.unk_id, t.bos_id, t.eos_id, t.pad_id) == (0, 1, 2, 3)
    assert t.cls_id is None and t.sep_id is None and t.mask_id is None
    assert t.decode(t.encode("the python interpreter")) == "the python interpreter"


def test_training_is_deterministic_and_reads_files(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("".join(f"line {i} of some sample text number {i * 7}\n" for i in range(200)))
    a = train_sentencepiece(text, tmp_path / "a", 60, kind="bert")
    b = train_sentencepiece(text, tmp_path / "b", 60, kind="bert")
    assert a.read_bytes() == b.read_bytes()
    assert Tokenizer(a).mask_id == 4


def test_missing_and_corrupt_model_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(DataError, match="bad.model"):
        Tokenizer(bad)
