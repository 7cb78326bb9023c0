"""SentencePiece tokenizer wrapper and trainer.

Two id layouts are used in Galaxy (both made by `train_sentencepiece`):

  kind="bert":  0=[PAD] 1=[UNK] 2=[CLS] 3=[SEP] 4=[MASK]
                ([CLS]/[SEP] are sentencepiece's bos/eos pieces, so bos_id == cls_id
                and eos_id == sep_id; [MASK] is a user-defined piece, so the text
                "[MASK]" encodes to mask_id)
  kind="llama": 0=<unk> 1=<s> (bos) 2=</s> (eos) 3=<pad>
                (LLaMA's own tokenizer has no pad piece; we add one at id 3 so
                padded batches need no special casing; cls/sep/mask are None)

Any other sentencepiece model loads too: attributes whose piece it lacks are None.
"""
import io
from pathlib import Path

import sentencepiece as spm

from .errors import DataError

_KINDS = {
    "bert": dict(pad_id=0, pad_piece="[PAD]", unk_id=1, unk_piece="[UNK]",
                 bos_id=2, bos_piece="[CLS]", eos_id=3, eos_piece="[SEP]",
                 user_defined_symbols=["[MASK]"]),
    "llama": dict(unk_id=0, unk_piece="<unk>", bos_id=1, bos_piece="<s>",
                  eos_id=2, eos_piece="</s>", pad_id=3, pad_piece="<pad>"),
}


class Tokenizer:
    """Encode/decode text with a sentencepiece model; exposes the special ids."""

    def __init__(self, model_file):
        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {self.model_file}")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.load(str(self.model_file))
        except (OSError, RuntimeError) as e:
            raise DataError(f"{self.model_file}: not a valid sentencepiece model ({e})") from None
        sp = self._sp
        self.vocab_size = sp.get_piece_size()
        self.unk_id = sp.unk_id()
        # sentencepiece reports a disabled piece as -1; expose it as None.
        self.pad_id, self.bos_id, self.eos_id = (
            i if i >= 0 else None for i in (sp.pad_id(), sp.bos_id(), sp.eos_id()))
        self.cls_id, self.sep_id, self.mask_id = (
            self._piece_id(p) for p in ("[CLS]", "[SEP]", "[MASK]"))
        # Ids that must never be masked or drawn as random replacement tokens.
        self.special_ids = sorted(
            {i for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i)}
            | ({self.mask_id} if self.mask_id is not None else set()))

    def _piece_id(self, piece):
        i = self._sp.piece_to_id(piece)  # unknown pieces map to unk_id
        return i if self._sp.id_to_piece(i) == piece else None

    def encode(self, text):
        """Token ids of text, without any special tokens added."""
        return self._sp.encode(text, out_type=int)

    def decode(self, ids):
        """Text of ids; control pieces ([PAD], [CLS], ...) decode to nothing."""
        return self._sp.decode([int(i) for i in ids])


def train_sentencepiece(text_lines_or_file, model_prefix, vocab_size, kind="bert",
                        model_type="unigram"):
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
        with open(text_lines_or_file, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
    else:
        lines = list(text_lines_or_file)
    lines = [line for line in lines if line.strip()]
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
