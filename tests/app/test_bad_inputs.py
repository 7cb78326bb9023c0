"""Every bad input of bad_inputs.CASES gets its message and exit code (run in-process: all fail
before a process group exists, so no ranks are spawned)."""
import pytest

from tests.app import bad_inputs


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    bad_inputs.write_files(d)
    return d


@pytest.mark.parametrize("what, args, expected, code", bad_inputs.CASES, ids=[c[0] for c in bad_inputs.CASES])
def test_bad_input(files, what, args, expected, code):
    got_code, output = bad_inputs.run_in_process(bad_inputs.fill(args, files))
    assert expected.replace("{d}", str(files)) in output, output[-2000:]
    assert got_code == code, output[-2000:]
