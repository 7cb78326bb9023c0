"""Tokenizers: SentencePiece models (wrapper and trainer) and Hugging Face's files
(tokenizer.json, or a BERT vocab.txt) through the optional `tokenizers` library.
`tokenizer_from(path)` opens either kind from a file or a checkpoint directory; both expose the
same special ids, encode / decode, and encode_batch (special tokens, truncation, padding).

Two SentencePiece id layouts are used in Galaxy (both made by `train_sentencepiece`):

  kind="bert":  0=[PAD] 1=[UNK] 2=[CLS] 3=[SEP] 4=[MASK]
                ([CLS]/[SEP] are sentencepiece's bos/eos pieces, so bos_id == cls_id
                and eos_id == sep_id; [MASK] is a user-defined piece, so the text
                "[MASK]" encodes to mask_id)
  kind="llama": 0=<unk> 1=<s> (bos) 2=</s> (eos) 3=<pad>
                (LLaMA's own tokenizer has no pad piece; we add one at id 3 so
                padded batches need no special casing; cls/sep/mask are None)

Any other sentencepiece model loads too: attributes whose piece it lacks are None.

A Hugging Face tokenizer's special tokens come from its directory's tokenizer_config.json and
special_tokens_map.json (the map wins, as in transformers); a token its files do not name is None
(BERT's [CLS] / [SEP] are cls_id / sep_id, not bos / eos). encode_batch adds the special tokens
its post-processor adds and cuts and pads as transformers' AutoTokenizer does.
"""
import io
import json
from pathlib import Path

import sentencepiece as spm
import torch

from .errors import DataError

_KINDS = {
    "bert": dict(pad_id=0, pad_piece="[PAD]", unk_id=1, unk_piece="[UNK]",
                 bos_id=2, bos_piece="[CLS]", eos_id=3, eos_piece="[SEP]",
                 user_defined_symbols=["[MASK]"]),
    "llama": dict(unk_id=0, unk_piece="<unk>", bos_id=1, bos_piece="<s>",
                  eos_id=2, eos_piece="</s>", pad_id=3, pad_piece="<pad>"),
}


def padded(rows, length, value, left=False):
    """Lists of ids as a LongTensor [len(rows), length], each filled up with `value` on its right (or left)."""
    fill = [[value] * (length - len(row)) for row in rows]
    return torch.tensor([f + row if left else row + f for row, f in zip(rows, fill, strict=True)],
                        dtype=torch.long).view(len(rows), length)


class _Batching:
    """encode_batch, shared by both kinds: each text with its special tokens, padded."""

    padding_side = "right"

    def encode_batch(self, texts, max_length=None, pad_to_max_length=False):
        """(input_ids, attention_mask) LongTensors [len(texts), T]: each text with its special
        tokens, cut to max_length (the special tokens kept) and padded to the longest text, or
        to max_length when pad_to_max_length."""
        if max_length is not None and max_length < self.num_special_tokens:
            raise ValueError(f"max_length {max_length} leaves no room for the {self.num_special_tokens} "
                             "special tokens every text gets")
        rows = [self.encode_with_special_tokens(text, max_length) for text in texts]
        length = max_length if pad_to_max_length else max(map(len, rows))
        pad = next((i for i in (self.pad_id, self.eos_id) if i is not None), 0)  # masked out either way
        left = self.padding_side == "left"
        return padded(rows, length, pad, left), padded([[1] * len(row) for row in rows], length, 0, left)


class Tokenizer(_Batching):
    """Encode/decode text with a sentencepiece model; exposes the special ids."""

    def __init__(self, model_file):
        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {self.model_file}")
        self._sp = sp = spm.SentencePieceProcessor()
        try:
            sp.load(str(self.model_file))
        except (OSError, RuntimeError) as e:
            raise DataError(f"{self.model_file}: not a valid sentencepiece model ({e})") from None
        self.vocab_size, self.unk_id = sp.get_piece_size(), sp.unk_id()
        # sentencepiece reports a disabled piece as -1; expose it as None.
        self.pad_id, self.bos_id, self.eos_id = (i if i >= 0 else None for i in (sp.pad_id(), sp.bos_id(), sp.eos_id()))
        self.cls_id, self.sep_id, self.mask_id = (self._piece_id(p) for p in ("[CLS]", "[SEP]", "[MASK]"))
        # Ids that must never be masked or drawn as random replacement tokens.
        self.special_ids = sorted({i for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i)}
                                  | ({self.mask_id} if self.mask_id is not None else set()))

    @property
    def _ends(self):
        """The ids before and after a text: [CLS] ... [SEP] (kind "bert"), else <s> ... when it has one."""
        if self.cls_id is not None and self.sep_id is not None:
            return [self.cls_id], [self.sep_id]
        return ([self.bos_id] if self.bos_id is not None else []), []

    @property
    def num_special_tokens(self):
        return sum(map(len, self._ends))

    def encode_with_special_tokens(self, text, max_length=None):
        """encode(text) between its special tokens, the text cut so that all fit max_length."""
        before, after = self._ends
        body = self.encode(text)
        if max_length is not None:
            body = body[:max_length - len(before) - len(after)]
        return before + body + after

    def _piece_id(self, piece):
        i = self._sp.piece_to_id(piece)  # unknown pieces map to unk_id
        return i if self._sp.id_to_piece(i) == piece else None

    def encode(self, text):
        """Token ids of text, without any special tokens added."""
        return self._sp.encode(text, out_type=int)

    def decode(self, ids):
        """Text of ids; control pieces ([PAD], [CLS], ...) decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def token(self, i):
        """The piece of one id (e.g. "▁the")."""
        return self._sp.id_to_piece(int(i))


HF_FILES = ("tokenizer.json", "vocab.txt")  # in the order a directory's are looked for
SPECIAL_TOKENS = ("pad", "unk", "bos", "eos", "cls", "sep", "mask")
BERT_SPECIAL_TOKENS = dict(pad="[PAD]", unk="[UNK]", cls="[CLS]", sep="[SEP]", mask="[MASK]")  # BertTokenizer's defaults


def _tokenizer_settings(directory):
    """tokenizer_config.json with special_tokens_map.json's tokens over it; a token given as an
    AddedToken dict ({"content": ...}) becomes its text."""
    settings = {}
    for file in (directory / "tokenizer_config.json", directory / "special_tokens_map.json"):
        if file.is_file():
            try:
                found = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"{file}: not a readable JSON file ({e})") from None
            settings.update({k: v for k, v in found.items() if v is not None})
    return {k: v["content"] if isinstance(v, dict) and "content" in v else v for k, v in settings.items()}


def _wordpiece(vocab, settings):
    """A BERT vocab.txt as transformers' BertTokenizer builds it: BERT normaliser and
    pre-tokenizer, WordPiece, [CLS] text [SEP]."""
    from tokenizers import Tokenizer as RustTokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    tok = RustTokenizer(WordPiece.from_file(str(vocab), unk_token=settings["unk_token"]))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=settings.get("tokenize_chinese_chars", True),
        strip_accents=settings.get("strip_accents"), lowercase=settings.get("do_lower_case", True))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = settings["cls_token"], settings["sep_token"]
    tok.post_processor = processors.BertProcessing((sep, tok.token_to_id(sep)), (cls, tok.token_to_id(cls)))
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([settings[f"{k}_token"] for k in BERT_SPECIAL_TOKENS])
    return tok


class HFTokenizer(_Batching):
    """A Hugging Face tokenizer: `path` is a tokenizer.json, a BERT vocab.txt, or the directory
    holding either (tokenizer.json first); special tokens come from the files beside it."""

    def __init__(self, path):
        try:
            import tokenizers
        except ImportError:
            raise DataError("Hugging Face tokenizer files (tokenizer.json, vocab.txt) need the `tokenizers` package: "
                            "pip install 'galaxy[hf]' (or pip install tokenizers)") from None
        self.model_file = path = Path(path)
        settings = _tokenizer_settings(path if path.is_dir() else path.parent)
        file = next((path / f for f in HF_FILES if (path / f).is_file()), path / "vocab.txt") if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer not found: {file}")
        if file.suffix == ".txt":
            settings = {**{f"{k}_token": v for k, v in BERT_SPECIAL_TOKENS.items()}, **settings}
            self._tok = _wordpiece(file, settings)
        else:
            try:
                self._tok = tokenizers.Tokenizer.from_file(str(file))
            except Exception as e:  # the Rust side raises its own Exception type
                raise DataError(f"{file}: not a valid tokenizer.json ({e})") from None
        self._tok.no_truncation()  # the file's own cut and padding: encode_batch is told each time
        self._tok.no_padding()
        self.padding_side = settings.get("padding_side", "right")
        self.truncation_side = settings.get("truncation_side", "right")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        for kind in SPECIAL_TOKENS:
            token = settings.get(f"{kind}_token")
            i = None if token is None else self._tok.token_to_id(token)
            if token is not None and i is None:
                raise DataError(f"{file}: special token {token!r} (named in its tokenizer_config.json or "
                                "special_tokens_map.json) is not in its vocabulary")
            setattr(self, f"{kind}_id", i)
        self.num_special_tokens = self._tok.num_special_tokens_to_add(is_pair=False)
        named = {getattr(self, f"{k}_id") for k in SPECIAL_TOKENS} - {None}
        self.special_ids = sorted(named | {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special})

    def encode(self, text):
        """Token ids of text, without any special tokens added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_special_tokens(self, text, max_length=None):
        """The tokenizer's special tokens around text, the text cut so that all fit max_length."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        if max_length is not None:
            encoding.truncate(max_length - self.num_special_tokens, direction=self.truncation_side)
        return self._tok.post_process(encoding, add_special_tokens=True).ids

    def decode(self, ids):
        """Text of ids; special tokens decode to nothing."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token(self, i):
        """The vocabulary entry of one id (e.g. "##ing")."""
        return self._tok.id_to_token(int(i))


def tokenizer_from(path):
    """The tokenizer in `path`: a directory holding tokenizer.json, vocab.txt or a SentencePiece
    tokenizer.model (in that order), or one such file (a .json or .txt file is a Hugging Face one)."""
    path = Path(path)
    if path.is_dir():
        if any((path / f).is_file() for f in HF_FILES):
            return HFTokenizer(path)
        if (path / "tokenizer.model").is_file():
            return Tokenizer(path / "tokenizer.model")
        raise FileNotFoundError(f"{path}: no tokenizer.json, vocab.txt or tokenizer.model in this directory")
    return HFTokenizer(path) if path.suffix in (".json", ".txt") else Tokenizer(path)


def holds_tokenizer(directory):
    """Whether a (checkpoint) directory brings its own tokenizer."""
    return Path(directory).is_dir() and any((Path(directory) / f).is_file() for f in (*HF_FILES, "tokenizer.model"))


def train_sentencepiece(text_lines_or_file, model_prefix, vocab_size, kind="bert", model_type="unigram"):
    """Train a model with the `kind` id layout (see module doc); returns "<prefix>.model".

    text_lines_or_file: an iterable of strings (one sentence/paragraph each) or the
    path of a UTF-8 text file with one per line. Training is single-threaded over
    all input lines, unshuffled, so the same input gives the same model bytes.
    model_type is "unigram" or "bpe". sentencepiece raises if vocab_size exceeds
    what the text can support.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {kind!r}")
    if isinstance(text_lines_or_file, (str, Path)):
        text_lines_or_file = Path(text_lines_or_file).read_text(encoding="utf-8").split("\n")
    lines = [line for line in text_lines_or_file if line.strip()]
    model = io.BytesIO()  # written via model_writer so no local path is stored in it
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, character_coverage=0.9995, num_threads=1,
        input_sentence_size=0, shuffle_input_sentence=False,
        # The default 4192-byte limit would silently skip long paragraphs.
        max_sentence_length=1 << 16, minloglevel=2, **_KINDS[kind])
    path = Path(f"{model_prefix}.model")
    path.write_bytes(model.getvalue())
    return path
