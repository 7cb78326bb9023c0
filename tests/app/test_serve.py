"""Serving (infer_galaxy.py --serve, galaxy/app/serve.py, infer.Server.follow): a server at world 2
in the Galaxy layout under --elastic takes concurrent good requests and malformed ones; rank 1
SIGKILLs itself after its third round; every good request gets the serial model's embeddings
(those in flight at the loss after the survivor regrouped), every bad one a 4xx with a message,
and the server keeps serving. A LLaMA server answers completions as greedy_generate does, and a
rank slowed mid-serving makes the ranks re-plan while the answers stay right."""
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from galaxy.app.answers import Ask
from galaxy.config.load import load_config
from galaxy.data import tokenizer_from
from galaxy.inference.generate import greedy_generate
from galaxy.models.registry import build_model
from tests.helpers import ROOT, SHIPPED
from tests.app.bad_inputs import run_in_process

TINY = ["--hidden_size", "64", "--num_hidden_layers", "2", "--intermediate_size", "128", "--seq_length", "32",
        "--threads", "1"]
GALAXY2 = ["--parallel", "galaxy", "--tp_num_attention_heads_list", "[3,1]", "--tp_intermediate_size_list", "[96,32]",
           "--seq_scatter_list", "[20,12]"]
TEXTS = ["The list is a mutable sequence.", "A tuple cannot change.", "Dictionaries map keys to values.",
         "for loops iterate over items", "x", "Galaxy splits a transformer over devices.", "an exception is raised",
         "the interpreter reads a file"]


class Server:
    """infer_galaxy.py --serve (through tests.scripts.patched_infer, whose ranks can kill themselves)."""

    def __init__(self, args, env=None, limit_s=240):
        env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.scripts.patched_infer", *args,
                                      "--serve", "127.0.0.1:0"], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()
        self.log, deadline = [], time.monotonic() + limit_s
        while not any("serving on" in line for line in self.log):
            try:
                self.log.append(self.lines.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                self.stop()
                raise AssertionError("no server within the limit:\n" + "".join(self.log))
        self.url = next(line for line in self.log if "serving on" in line).split()[4]

    def stop(self):
        """SIGTERM to the launcher (every rank stops); returns its exit code and whole output."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        time.sleep(0.2)
        while not self.lines.empty():
            self.log.append(self.lines.get())
        return code, "".join(self.log)


def call(url, path, body=None, raw=None, timeout=180):
    """(status, JSON) of a GET (body None) or POST."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def serial_embeddings(texts, **keys):
    cfg = load_config(ROOT / "train_config/bert/galaxy/full.json",
                      dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, seq_length=32, parallel="serial",
                           **keys))
    tok = tokenizer_from(SHIPPED / "spm_bert.model")
    ids, mask = tok.encode_batch(texts, max_length=32, pad_to_max_length=True)
    with torch.no_grad():
        return torch.stack(Ask("embed").forward(build_model(cfg).eval())(ids, mask))


BAD = [  # (path, body or raw bytes, status, part of the message)
    ("/v1/embeddings", b'{"input": ["unclosed', 400, "the body is not JSON"),
    ("/v1/embeddings", {"input": []}, 400, "input is empty"),
    ("/v1/embeddings", {"input": ["ok", ""]}, 400, "input[1] is an empty string"),
    ("/v1/embeddings", {"input": [1, 2]}, 400, "input must be a string or a list of strings"),
    ("/v1/embeddings", {"text": "hi"}, 400, "missing 'input'"),
    ("/v1/embeddings", {"input": "word " * 60}, 400, "tokens with its special tokens; this server takes at most 32"),
    ("/v1/completions", {"prompt": "hi"}, 400, "task 'generate' needs a llama model; this one is bert"),
    ("/v1/translate", {"input": "hi"}, 404, "no endpoint POST /v1/translate"),
    ("/v1/embeddings", b"[1, 2]", 400, "the body must be a JSON object"),
]


def test_concurrent_and_bad_requests_and_a_lost_rank_under_elastic():
    want = serial_embeddings(TEXTS)
    server = Server(["--world", "2", *TINY, *GALAXY2, "--elastic", "--timeout_s", "20", "--batch_size", "4"],
                    env={"GALAXY_TEST_KILL": "1,3,2"})
    try:
        status, health = call(server.url, "/health")
        assert status == 200 and health["world"] == 2 and len(health["pids"]) == 2, health
        results, errors = [], []

        def client(i):
            for k in range(4):
                texts = TEXTS[(i + k) % len(TEXTS):][:1 + (i + k) % 3]
                status, body = call(server.url, "/v1/embeddings", {"input": texts if k % 2 else texts[0]})
                results.append((texts if k % 2 else texts[:1], status, body))
                path, payload, code, message = BAD[(i * 4 + k) % len(BAD)]
                raw = payload if isinstance(payload, bytes) else None
                got = call(server.url, path, None if raw else payload, raw)
                errors.append((path, got, code, message))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert len(results) == 24 and len(errors) == 24
        for texts, status, body in results:
            assert status == 200, body
            got = torch.tensor([row["embedding"] for row in sorted(body["data"], key=lambda r: r["index"])])
            expected = want[[TEXTS.index(t) for t in texts]]
            cosine = torch.nn.functional.cosine_similarity(got, expected)
            assert (cosine >= 0.99999).all() and body["usage"]["prompt_tokens"] > 0, (texts, cosine)
        for path, (status, body), code, message in errors:
            assert status == code and message in body["error"]["message"], (path, status, body)
        status, health = call(server.url, "/health")
        assert health["world"] == 1 and health["served"] > 3, health  # the survivor serves on alone
    finally:
        code, log = server.stop()
    assert "rank 1 was killed by SIGKILL; regroup 1 of 3" in log, log
    assert "elastic: lost rank(s) [1] during request 3" in log, log
    assert "stopped by signal 15" in log and code == 128 + signal.SIGTERM, log


LLAMA = ["--config_file", "train_config/llama/tp/full.json", "--num_attention_heads", "8", "--num_key_value_heads", "4"]
PROMPTS = ["Question: What is a list?\nAnswer:", "the python interpreter", "def f(x):", "A tuple", "import os"]


def serial_completions(prompts, max_tokens):
    cfg = load_config(ROOT / "train_config/llama/tp/full.json",
                      dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, seq_length=32, parallel="serial",
                           num_attention_heads=8, num_key_value_heads=4))
    tok, model = tokenizer_from(SHIPPED / "spm_llama.model"), build_model(cfg).eval()
    out = []
    for prompt in prompts:
        ids = torch.tensor([tok.encode_with_special_tokens(prompt)])
        out.append(greedy_generate(model, ids, max_tokens, tok.eos_id)[0, ids.shape[1]:].tolist())
    return tok, out


def test_completions_while_a_slowed_rank_makes_the_ranks_replan():
    """LLaMA TP at world 2 with live re-planning; rank 1 computes 6 times slower from its 3rd round
    on. Requests go one after another until the split has moved and two more were answered."""
    tok, want = serial_completions(PROMPTS, 5)
    server = Server(["--world", "2", *TINY, *LLAMA, "--replan", '{"threshold": 0.25, "patience": 3, "warmup": 2}',
                     "--timeout_s", "60"], env={"GALAXY_TEST_SLOW": "1,3,6"})
    try:
        status, health = call(server.url, "/health")
        before, after_move = health["plan"], 0
        for i in range(20):
            prompts = [PROMPTS[i % len(PROMPTS)]] if i % 2 else PROMPTS[:2]
            status, body = call(server.url, "/v1/completions", {"prompt": prompts, "max_tokens": 5, "temperature": 0})
            assert status == 200, body
            for choice, prompt in zip(sorted(body["choices"], key=lambda c: c["index"]), prompts, strict=True):
                new = want[PROMPTS.index(prompt)]
                assert choice["text"] == tok.decode(new), (i, prompt, choice)
                assert choice["finish_reason"] == ("stop" if new[-1] == tok.eos_id else "length")
            assert body["usage"]["completion_tokens"] == sum(len(want[PROMPTS.index(p)]) for p in prompts)
            after_move += call(server.url, "/health")[1]["plan"] != before
            if after_move > 2:
                break
        assert after_move > 2, f"no move in 20 requests: {before}"
        status, body = call(server.url, "/v1/completions", {"prompt": "hi", "temperature": 0.7})
        assert status == 400 and "decodes greedily" in body["error"]["message"], body
        status, body = call(server.url, "/v1/embeddings", {"input": "hi"})
        assert status == 400 and "this server answers POST /v1/completions" in body["error"]["message"], body
    finally:
        code, log = server.stop()
    assert "replan after step" in log, log


def test_a_port_in_use_stops_before_any_rank_starts():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code, out = run_in_process(["infer_galaxy.py", "--world", "2", "--serve", f"127.0.0.1:{port}"])
    assert code == 2 and f"--serve 127.0.0.1:{port}: cannot listen there (Address already in use)" in out, out
    assert "[rank" not in out
