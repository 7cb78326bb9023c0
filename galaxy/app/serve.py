"""infer_galaxy.py --serve HOST:PORT: the model stays loaded across the ranks and rank 0 answers
HTTP with JSON in the shapes OpenAI's clients speak (standard library only):

    POST /v1/embeddings    {"input": "text" | ["text", ...]}                  (BERT: task embed)
    POST /v1/completions   {"prompt": "text" | [...], "max_tokens": 16}       (LLaMA: greedy, temperature 0)
    GET  /health           {"status": "ok", "model", "world", "plan", "served", "pids"}

Handler threads check a request (a bad one gets a 4xx with {"error": {"message", "type"}} and the
server goes on) and queue it; the ranks' loop (infer.Server.follow) takes queued requests in
rounds, merging those of the same task and options up to --batch_size texts, and every rank
computes each round; the others follow rank 0's rounds. Under --elastic a round in flight when a
rank is lost is served again by the survivors and answered, not lost. Rank 0 must survive: it
holds the socket.
"""
import argparse
import json
import os
import queue
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from galaxy.app.answers import Ask, check_task

IDLE_S = 0.5  # an idle round this often: a lost rank is noticed, and a stop, within about this time
MAX_BODY = 1 << 20  # bytes of one request body
ENDPOINTS = {"/v1/embeddings": ("embed", "input"), "/v1/completions": ("generate", "prompt")}


def address(text):
    """argparse type of --serve: HOST:PORT (port 0: any free port, printed at start)."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:8000)")
    return host, int(port)


def check_address(host, port):
    """Why rank 0 could not listen on host:port, or None: bound once before any rank starts, so a
    port in use or a host that is not this machine's ends the command with a message instead of
    rank 0 after the others joined."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        return f"--serve {host}:{port}: cannot listen there ({os.strerror(e.errno) if e.errno else e})"
    return None


class BadRequest(Exception):
    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


class Job:
    """One HTTP request's texts, waiting for their answers."""

    def __init__(self, ask, texts, tokens):
        self.ask, self.texts, self.tokens = ask, texts, tokens
        self.done, self.answers, self.error = threading.Event(), None, None


class Round:
    """Queued jobs of one task and options, answered together."""

    def __init__(self, jobs):
        self.jobs, self.ask = jobs, jobs[0].ask
        self.texts = [text for job in jobs for text in job.texts]


class Front:
    """Rank 0's side: the HTTP server (serving once built), the queue of jobs, and take / give for Server.follow."""

    def __init__(self, cfg, tok, host, port, batch_size, answer_timeout_s, health, stop=lambda: False):
        self.cfg, self.tok, self.batch_size, self.answer_timeout_s = cfg, tok, batch_size, answer_timeout_s
        self.health, self.stop = health, stop
        self.jobs, self.held, self.taken, self.served = queue.Queue(), None, None, 0
        self.name = Path(cfg["load_checkpoint"]).name if cfg["load_checkpoint"] else cfg["model"]
        self.paths = [p for p, (task, _) in ENDPOINTS.items() if check_task(task, cfg["model"]) is None]  # those served
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.front = self
        self.url = "http://{}:{}".format(*self.httpd.server_address[:2])
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()

    def close(self, error=None):
        """Stop listening; every request still waiting gets 503 naming `error` (or the stop)."""
        self.httpd.shutdown()
        self.httpd.server_close()
        pending = (self.taken.jobs if self.taken else []) + ([self.held] if self.held else [])
        while not self.jobs.empty():
            pending.append(self.jobs.get_nowait())
        for job in pending:
            job.error = BadRequest(f"the server stopped before answering ({error or 'stopped'})", 503)
            job.done.set()

    # ---- the ranks' loop (Server.follow) ----

    def take(self):
        """The next round: "stop", "idle" (nothing came within IDLE_S), or a Round of the first
        queued job and those after it of the same task and options, up to batch_size texts."""
        if self.stop():
            return "stop"
        try:
            jobs = [self._next(IDLE_S)]
        except queue.Empty:
            return "idle"
        while True:
            try:
                job = self._next(0)
            except queue.Empty:
                break
            if job.ask != jobs[0].ask or sum(len(j.texts) for j in jobs) + len(job.texts) > self.batch_size:
                self.held = job  # first in the next round
                break
            jobs.append(job)
        self.taken = Round(jobs)
        return self.taken

    def _next(self, timeout):
        if self.held:
            job, self.held = self.held, None
            return job
        return self.jobs.get(timeout=timeout) if timeout else self.jobs.get_nowait()

    def give(self, round_, answers, latency):
        self.served, self.taken = self.served + 1, None
        for job in round_.jobs:  # the answers of the round's texts, in order
            job.answers, answers = answers[:len(job.texts)], answers[len(job.texts):]
            job.done.set()

    # ---- a handler thread's side ----

    def answer(self, path, body):
        """(status, JSON) of a POST."""
        if path not in ENDPOINTS:
            raise BadRequest(f"no endpoint POST {path}; this server answers POST {' and '.join(ENDPOINTS)}", 404)
        task, key = ENDPOINTS[path]
        problem = check_task(task, self.cfg["model"])
        if problem:
            raise BadRequest(f"POST {path}: {problem}; this server answers POST {' and '.join(self.paths)}")
        request = _json_object(body)
        texts = _texts(request, key)
        ask = self._ask(task, request)
        job = Job(ask, texts, [self._tokens(text, i, key, ask) for i, text in enumerate(texts)])
        self.jobs.put(job)
        if not job.done.wait(self.answer_timeout_s):
            raise BadRequest(f"no answer within {self.answer_timeout_s:.0f} s", 503)
        if job.error:
            raise job.error
        return (self._embeddings if task == "embed" else self._completions)(job)

    def _ask(self, task, request):
        if task == "embed":
            if request.get("encoding_format", "float") != "float":
                raise BadRequest("encoding_format: only \"float\" is served")
            return Ask(task)
        for key, allowed in (("temperature", (0, 0.0)), ("n", (1,)), ("stream", (False,)), ("best_of", (1,))):
            if key in request and request[key] not in allowed:
                raise BadRequest(f"{key} {request[key]!r}: this server decodes greedily, one completion a prompt, "
                                 f"not streamed ({key} may be {allowed[0]!r} or left out)")
        max_tokens = request.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise BadRequest(f"max_tokens must be a positive integer, got {max_tokens!r}")
        return Ask(task, max_new_tokens=max_tokens, eos_id=self.tok.eos_id)

    def _tokens(self, text, i, key, ask):
        """The text's token count with its special tokens, if it fits."""
        n = len(self.tok.encode_with_special_tokens(text))
        if n > self.cfg["seq_length"]:
            raise BadRequest(f"{key}[{i}] is {n} tokens with its special tokens; this server takes at most "
                             f"{self.cfg['seq_length']} (seq_length)")
        limit = self.cfg["max_position_embeddings"]
        if ask.task == "generate" and n + ask.max_new_tokens > limit:
            raise BadRequest(f"{key}[{i}]: {n} tokens + max_tokens {ask.max_new_tokens} exceed the model's "
                             f"{limit} positions")
        return n

    def _embeddings(self, job):
        data = [{"object": "embedding", "index": i, "embedding": e.tolist()} for i, e in enumerate(job.answers)]
        used = sum(job.tokens)
        return {"object": "list", "data": data, "model": self.name,
                "usage": {"prompt_tokens": used, "total_tokens": used}}

    def _completions(self, job):
        choices = [{"index": i, "text": self.tok.decode(new), "logprobs": None,
                    "finish_reason": "stop" if new and new[-1] == self.tok.eos_id else "length"}
                   for i, new in enumerate(job.answers)]
        prompt, completion = sum(job.tokens), sum(len(new) for new in job.answers)
        return {"id": f"cmpl-{id(job):x}", "object": "text_completion", "created": int(time.time()),
                "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion}}


def _json_object(body):
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"the body is not JSON ({e})") from None
    if not isinstance(request, dict):
        raise BadRequest("the body must be a JSON object")
    return request


def _texts(request, key):
    """The request's texts: a non-empty string or a non-empty list of them."""
    if key not in request:
        raise BadRequest(f"missing {key!r}")
    texts = [request[key]] if isinstance(request[key], str) else request[key]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise BadRequest(f"{key} must be a string or a list of strings")
    if not texts or not all(texts):
        raise BadRequest(f"{key} is empty" if not texts else f"{key}[{texts.index('')}] is an empty string")
    return texts


class _Handler(BaseHTTPRequestHandler):
    server_version = "galaxy"
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        front = self.server.front
        if self.path != "/health":
            return self._send(404, _error(f"no endpoint GET {self.path}; GET /health", 404))
        self._send(200, {"status": "ok", "model": front.name, "served": front.served, **front.health()})

    def do_POST(self):
        try:
            length = self.headers.get("Content-Length", "0")
            if not length.isdigit():
                self.close_connection = True
                raise BadRequest(f"Content-Length {length!r} is not a number of bytes")
            length = int(length)
            if length > MAX_BODY:
                self.close_connection = True  # the body is left unread
                raise BadRequest(f"the body is {length} bytes; at most {MAX_BODY}", 413)
            self._send(200, self.server.front.answer(self.path, self.rfile.read(length)))
        except BadRequest as e:
            self._send(e.status, _error(str(e), e.status))

    def _send(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # no access log on the ranks' output
        pass


def _error(message, status=400):
    return {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error"}}
