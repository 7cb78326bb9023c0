import json

import pytest

from galaxy.data import Tokenizer
from tests.helpers import SHIPPED, tiny_llama_tokenizer


@pytest.fixture(scope="session")
def bert_tok():
    return Tokenizer(SHIPPED / "spm_bert.model")


@pytest.fixture(scope="session")
def llama_tok(tmp_path_factory):
    return Tokenizer(tiny_llama_tokenizer(tmp_path_factory.mktemp("spm")))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
