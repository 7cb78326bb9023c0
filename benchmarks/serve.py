"""Load on a running `infer_galaxy.py --serve` server: N concurrent clients, each sending its next
request as soon as the last is answered, for a fixed time; then the latency percentiles, the
throughput and the errors (any status but 200, or no answer). --kill_rank R SIGKILLs rank R's
process (its PID from GET /health: the server must run on this machine) --kill_after seconds into
the run, to measure serving across a loss under --elastic.

    python infer_galaxy.py --world 2 --parallel galaxy --elastic --serve 127.0.0.1:8000 &
    python -m benchmarks.serve --url http://127.0.0.1:8000 --clients 8 --seconds 30 --kill_rank 1 --kill_after 10

Requests are /v1/embeddings of --batch texts (or /v1/completions with --endpoint completions),
taken in turn from --texts (default: lines of the shipped corpus).
"""
import argparse
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import torch

from galaxy.data import read_jsonl

CORPUS = Path(__file__).resolve().parents[1] / "data" / "python_docs" / "pretrain.jsonl"


def post(url, path, body, timeout):
    """(status, seconds) of one POST; status 0 when no answer came."""
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError:
        status = 0
    return status, time.perf_counter() - start


def health(url):
    with urllib.request.urlopen(url + "/health", timeout=30) as response:
        return json.loads(response.read())


def run_load(url, bodies, path, clients, seconds, timeout=300, kill_rank=None, kill_after=None):
    """([(status, seconds)] of every request sent by `clients` threads for `seconds`, the seconds
    until the last was answered); kills rank kill_rank's process kill_after seconds in."""
    results, lock, start = [], threading.Lock(), time.monotonic()
    end = start + seconds

    def client(i):
        k = i
        while time.monotonic() < end:
            outcome = post(url, path, bodies[k % len(bodies)], timeout)
            with lock:
                results.append(outcome)
            k += clients

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    if kill_rank is not None:
        pid = health(url)["pids"][kill_rank]
        time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join()
    return results, time.monotonic() - start


def summary(results, seconds, clients):
    ok = torch.tensor([s for status, s in results if status == 200], dtype=torch.float64) * 1e3
    errors = Counter(status for status, _ in results if status != 200)  # status 0: no answer
    p50, p99 = torch.quantile(ok, torch.tensor([0.5, 0.99], dtype=torch.float64)).tolist() if len(ok) else (0, 0)
    return (f"{clients} clients, {seconds:.1f} s: {len(results)} requests, {sum(errors.values())} errors {dict(errors)}; latency p50 "
            f"{p50:.1f} ms, p99 {p99:.1f} ms; throughput {len(ok) / seconds:.2f} answered requests/s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the clients send")
    parser.add_argument("--endpoint", choices=["embeddings", "completions"], default="embeddings")
    parser.add_argument("--batch", type=int, default=1, help="texts per request")
    parser.add_argument("--max_tokens", type=int, default=8, help="completions: new tokens per prompt")
    parser.add_argument("--texts", default=None, help="one text a line (default: the shipped corpus' titles)")
    parser.add_argument("--kill_rank", type=int, default=None, help="SIGKILL this rank's process mid-load")
    parser.add_argument("--kill_after", type=float, default=5.0, help="seconds into the run of the kill")
    args = parser.parse_args(argv)
    if args.texts:
        with open(args.texts, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    else:
        lines = [row["title"] for row in read_jsonl(CORPUS, ("title", "content"))]
    groups = [lines[i:i + args.batch] for i in range(0, len(lines) - args.batch + 1, args.batch)]
    if args.endpoint == "embeddings":
        bodies = [{"input": g} for g in groups]
    else:
        bodies = [{"prompt": g, "max_tokens": args.max_tokens, "temperature": 0} for g in groups]
    results, seconds = run_load(args.url, bodies, f"/v1/{args.endpoint}", args.clients, args.seconds,
                                kill_rank=args.kill_rank, kill_after=args.kill_after)
    print(summary(results, seconds, args.clients))
    return results


if __name__ == "__main__":
    main()
