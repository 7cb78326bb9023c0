import json
from pathlib import Path

import pytest

from galaxy.data import Tokenizer, train_sentencepiece

SHIPPED = Path(__file__).resolve().parents[2] / "data" / "python_docs"


@pytest.fixture(scope="session")
def bert_tok():
    return Tokenizer(SHIPPED / "spm_bert.model")


@pytest.fixture(scope="session")
def llama_tok(tmp_path_factory):
    """A tiny kind="llama" model trained on the first shipped documents."""
    lines = []
    with open(SHIPPED / "pretrain.jsonl", encoding="utf-8") as f:
        for _, line in zip(range(60), f):
            row = json.loads(line)
            lines += [row["title"], *row["content"].split("\n")]
    path = train_sentencepiece(lines, tmp_path_factory.mktemp("spm") / "tiny", 300, kind="llama")
    return Tokenizer(path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
