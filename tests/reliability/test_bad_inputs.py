"""Every bad input of bad_inputs.CASES (pretrain_galaxy.py) and INFER_CASES (infer_galaxy.py) gets
its message and exit code (run in-process: all fail before a process group exists, so no ranks
are spawned)."""
import pytest

from tests.reliability import bad_inputs

CASES = [("pretrain_galaxy.py", *case) for case in bad_inputs.CASES] + \
    [("infer_galaxy.py", *case) for case in bad_inputs.INFER_CASES]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    bad_inputs.write_files(d)
    return d


@pytest.mark.parametrize("script, what, args, expected, code", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_bad_input(files, script, what, args, expected, code):
    got_code, output = bad_inputs.run_in_process(bad_inputs.fill(args, files), script)
    assert expected.replace("{d}", str(files)) in output, output[-2000:]
    assert got_code == code, output[-2000:]
