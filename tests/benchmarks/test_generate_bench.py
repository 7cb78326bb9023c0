"""benchmarks/generate.py on a tiny model at world 2: a row per layout, and every layout's tokens
equal serial's."""
import pytest

from benchmarks import generate

TINY = ["--hidden_size", "64", "--intermediate_size", "96", "--tp_intermediate_size_list", "[64,32]",
        "--prompt", "8", "--new_tokens", "3", "--repeats", "1"]


def test_every_layout_is_timed_and_generates_serials_tokens(capsys):
    generate.main(TINY)
    out = capsys.readouterr().out
    assert "tokens equal serial's: serial, tp, galaxy, galaxy2, sp, pp\n" in out
    rows = [line.split() for line in out.splitlines()[3:9]]
    assert [row[0] for row in rows] == list(generate.LAYOUTS) and all(len(row) == 7 for row in rows)


def test_a_bad_split_is_refused_before_ranks_start(capsys):
    with pytest.raises(SystemExit) as stop:
        generate.parse(TINY + ["--tp_num_attention_heads_list", "[5,3]"])
    assert stop.value.code == 2
    assert "tp_num_attention_heads_list [5, 3] splits GQA groups of 2" in capsys.readouterr().err
