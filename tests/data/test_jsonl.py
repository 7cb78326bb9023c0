import re

import pytest

from galaxy.data import DataError, read_jsonl


@pytest.mark.parametrize("content, where, why", [
    (b"", "", "empty file"),
    (b"\n  \n", "", "empty file"),
    (b'{"input": "a", "target": "b"}\n{"input": "\xff", "target": "b"}\n', ":2", "not valid UTF-8"),
    (b'{"input": "a", "target": "b"}\n\n{"input": "a", "target": }\n', ":3", "malformed JSON"),
    (b'["input", "target"]\n', ":1", "expected a JSON object"),
    (b'{"input": "a"}\n', ":1", "missing key 'target'"),
    (b'{"input": "a", "target": 3}\n', ":1", "key 'target' must be a string"),
])
def test_errors_name_file_and_line(tmp_path, content, where, why):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(f"{path}{where}: {why}")):
        read_jsonl(path, ("input", "target"))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="absent.jsonl"):
        read_jsonl(tmp_path / "absent.jsonl", ("input",))


def test_reads_rows_and_skips_blank_lines(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text('{"input": "a", "target": "b", "extra": 1}\n\n{"input": "c", "target": "d"}\n')
    rows = read_jsonl(path, ("input", "target"))
    assert [r["target"] for r in rows] == ["b", "d"]
