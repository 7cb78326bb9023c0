"""benchmarks/serve.py against a world-2 Galaxy server under --elastic, rank 1 killed mid-load:
every request sent is answered (0 errors). Slow: kept out of CI."""
import pytest

from benchmarks import serve as bench
from tests.app.test_serve import GALAXY2, TEXTS, TINY, Server


@pytest.mark.slow
def test_no_request_is_lost_when_a_rank_dies_mid_load(capsys, tmp_path):
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS))
    server = Server(["--world", "2", *TINY, *GALAXY2, "--elastic", "--timeout_s", "20", "--batch_size", "8"])
    try:
        results = bench.main(["--url", server.url, "--clients", "4", "--seconds", "12", "--batch", "2",
                              "--texts", str(tmp_path / "texts.txt"), "--kill_rank", "1", "--kill_after", "4"])
    finally:
        _, log = server.stop()
    assert results and all(status == 200 for status, _ in results), [r for r in results if r[0] != 200]
    assert "rank 1 was killed by SIGKILL; regroup 1 of 3" in log, log
    print(capsys.readouterr().out)
