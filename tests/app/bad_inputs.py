"""Bad inputs to pretrain_galaxy.py (or the entry script a case's arguments start with) and what
each gets: the cases test_bad_inputs.py checks in-process, and the table of docs/bad_inputs.md,
made by running them for real:

    python -m tests.app.bad_inputs > docs/bad_inputs.md
"""
import contextlib
import io
import json
import runpy
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from tests import procs

CORPUS = ["--data", "corpus", "--vocab_size", "8000", "--max_steps", "1"]
SYNTH = ["--max_steps", "1"]
LORA_FILE = "model-stage00-of-01.safetensors"  # a bare file has no tuning.json: checked tensor by tensor


def write_files(d):
    """The bad files the cases point at, under directory d."""
    d = Path(d)
    (d / "empty.jsonl").write_bytes(b"\n\n")
    (d / "latin1.jsonl").write_bytes(b'{"title": "ok", "content": "fine"}\n{"title": "caf\xe9", "content": "x"}\n')
    (d / "malformed.jsonl").write_text('{"title": "a", "content": "b"}\n{"title": "a", "content": \n')
    (d / "missing_key.jsonl").write_text('{"title": "a", "text": "b"}\n')
    (d / "short.jsonl").write_text('{"title": "A", "content": "few words only"}\n')
    (d / "long.jsonl").write_text('{"title": "long", "content": "%s"}\n' % ("the module defines a class " * 400))
    (d / "not_json.json").write_text("{batch_size: 8")
    (d / "cycle_a.json").write_text('{"include": ["cycle_b.json"]}')
    (d / "cycle_b.json").write_text('{"include": ["cycle_a.json"]}')
    (d / "latin1.txt").write_bytes(b"fine\ncaf\xe9\n")
    (d / "long.txt").write_text("a short line\n" + "the module defines a class " * 20 + "\n")
    (d / "texts.txt").write_text("The list is a [MASK] sequence.\nA tuple cannot change.\n")
    (d / "blank.txt").write_text("\n  \n")
    (d / "pairs_no_target.jsonl").write_text('{"input": "What is a list?", "answer": "A sequence."}\n')
    (d / "two_pairs.jsonl").write_text('{"input": "q1", "target": "a1"}\n{"input": "q2", "target": "a2"}\n')
    (d / "garbage.safetensors").write_bytes(b"\x00" * 64)
    (d / "no_model").mkdir(exist_ok=True)
    (d / "empty_save").mkdir(exist_ok=True)
    (d / "locked").mkdir(exist_ok=True)  # held by a live process (PID 1 is always alive)
    (d / "locked" / ".galaxy-lock.json").write_text(json.dumps({  # as a run writes it
        "host": socket.gethostname(), "pid": 1, "since": "2026-12-01 09:00:00", "command": "pretrain_galaxy.py ..."}))
    run_in_process(["--max_steps", "1", "--use_lora", "true", "--lora_dim", "4", "--save_dir", str(d / "lora"),
                    "--save_trainable_only", "true"])
    run_in_process(["--max_steps", "1", "--save_dir", str(d / "ck"), "--save_every", "1"])
    shutil.copytree(d / "ck", d / "ck_bad", dirs_exist_ok=True)
    victim = d / "ck_bad" / "step-00000001" / "rank-00000.optim.safetensors"
    data = victim.read_bytes()
    victim.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))


# (input, arguments with {d} for the files' directory, text the output must contain, exit code);
# arguments that start with a script's name run that script instead of pretrain_galaxy.py
CASES = [
    ("unknown option", ["--hiden_size", "64"], "unknown option --hiden_size", 2),
    ("wrong type", ["--batch_size", "eight"], "--batch_size 'eight' is not a valid int", 2),
    ("out of range", ["--batch_size", "0"], "config key 'batch_size' must be >= 1, got 0", 2),
    ("dropout out of range", ["--hidden_dropout_prob", "1.5"], "'hidden_dropout_prob' must be in [0, 1), got 1.5", 2),
    ("negative learning rate", ["--lr", "-1"], "config key 'learning_rate' must be >= 0, got -1.0", 2),
    ("zero timeout", ["--timeout_s", "0"], "config key 'timeout_s' must be > 0, got 0.0", 2),
    ("heads do not divide hidden", ["--num_attention_heads", "3"], "hidden_size 64 is not divisible by num_attention_heads 3", 2),
    ("no key/value heads", ["--num_key_value_heads", "0"],
     "config key 'num_key_value_heads' is 0; it must be >= 1 and divide num_attention_heads 2", 2),
    ("key/value heads do not group the heads", ["--num_key_value_heads", "3"],
     "config key 'num_key_value_heads' is 3; it must be >= 1 and divide num_attention_heads 2", 2),
    ("sequence longer than positions", ["--seq_length", "600"], "seq_length 600 exceeds max_position_embeddings 512", 2),
    ("two tuning methods", ["--use_lora", "true", "--use_adapter", "true"], "tuning methods ['use_lora', 'use_adapter'] are all true", 2),
    ("head split sums wrong", ["--world", "2", "--parallel", "tp", "--tp_num_attention_heads_list", "[2,1]"],
     "tp_num_attention_heads_list [2, 1] sums to 3, model has 2 attention heads", 2),
    ("batch does not split over DP", ["--world", "2", "--parallel", "dp", "--batch_size", "5"],
     "batch_size 5 does not split evenly over 2 data-parallel replicas", 2),
    ("re-planning without a tensor split", ["--world", "2", "--parallel", "dp", "--replan", "{}"],
     "config key 'replan' moves attention heads and MLP columns between tensor ranks", 2),
    ("re-planning key misspelt", ["--world", "2", "--parallel", "galaxy", "--replan", '{"treshold": 0.2}'],
     "config key 'replan' has unknown keys ['treshold']", 2),
    ("nccl without CUDA", ["--world", "2", "--backend", "nccl"], "--backend nccl needs a CUDA GPU and torch sees none", 1),
    ("rank outside world", ["--world", "2", "--rank", "5"], "--rank 5 is outside 0..1 for --world 2", 2),
    ("world of no ranks", ["--world", "0"], "--world 0 must be at least 1", 2),
    ("local spawn of far more ranks than cores", ["--world", "1000", "--parallel", "dp", "--batch_size", "1000"],
     "--world 1000 would start 1000 ranks on this machine's", 2),
    ("no split lists, fewer heads than ranks", ["--world", "3", "--parallel", "galaxy"],
     "tp_num_attention_heads_list is not given and 2 attention heads cannot give each of 3 ranks one", 2),
    ("LLaMA has no synthetic data", ["finetune_llama.py", "--config_file", "train_config/llama/full.json",
                                     "--num_key_value_heads", "2", "--vocab_size", "500"],
     "config key 'data' is 'synthetic': llama trains on data 'instruction' or 'corpus'", 2),
    ("resume without save_dir", ["--resume", "true"], "'resume' is True but save_dir is not set", 2),
    ("ZeRO shard list without zero_stage", ["--world", "2", "--parallel", "dp", "--zero_shard_list", "[0.7,0.3]"],
     "config key 'zero_shard_list' [0.7, 0.3] has no effect without zero_stage: it sets ZeRO's shards", 2),
    ("keys of another tuning method", [*SYNTH, "--use_adapter", "true", "--lora_dim", "4"],
     "galaxy: warning: config key lora_dim 4 has no effect: the tuning method is use_adapter", 0),
    ("a split list the layout does not use", ["--world", "2", "--parallel", "tp", "--seq_scatter_list", "[16,16]",
                                              "--explain"],
     "galaxy: warning: config key seq_scatter_list [16, 16] has no effect: no block splits sequence positions "
     "(ATT=TP CON=NONE MLP=TP)", 0),
    ("pipeline keys without stages", ["--world", "2", "--parallel", "galaxy", "--num_microbatches", "2", "--explain"],
     "galaxy: warning: config key num_microbatches 2 has no effect: there are no pipeline stages", 0),
    ("memory report of one step", ["--max_steps", "1", "--memory_report", "true"],
     "'memory_report' measures the second step", 2),
    ("missing config file", ["--config_file", "{d}/nope.json"], "config file {d}/nope.json does not exist", 2),
    ("config file not JSON", ["--config_file", "{d}/not_json.json"], "config file {d}/not_json.json is not valid JSON", 2),
    ("config files include each other", ["--config_file", "{d}/cycle_a.json"],
     "config files include each other in a cycle: {d}/cycle_a.json -> {d}/cycle_b.json -> {d}/cycle_a.json", 2),
    ("missing data file", [*CORPUS, "--data_file", "{d}/nope.jsonl"], "{d}/nope.jsonl: cannot read (No such file or directory)", 1),
    ("empty data file", [*CORPUS, "--data_file", "{d}/empty.jsonl"], "{d}/empty.jsonl: empty file", 1),
    ("non-UTF-8 data", [*CORPUS, "--data_file", "{d}/latin1.jsonl"], "{d}/latin1.jsonl:2: not valid UTF-8 (byte 15)", 1),
    ("malformed JSON line", [*CORPUS, "--data_file", "{d}/malformed.jsonl"], "{d}/malformed.jsonl:2: malformed JSON", 1),
    ("missing JSON key", [*CORPUS, "--data_file", "{d}/missing_key.jsonl"], "{d}/missing_key.jsonl:1: missing key 'content'", 1),
    ("data shorter than one sequence", [*CORPUS, "--data_file", "{d}/short.jsonl"],
     "{d}/short.jsonl: 4 tokens, too few for one sequence of length 32", 1),
    ("data shorter than one batch", [*CORPUS, "--data_file", "{d}/long.jsonl", "--batch_size", "1000"],
     "fewer than one batch (batch_size 1000)", 1),
    ("document longer than seq_length", [*CORPUS, "--data_file", "{d}/long.jsonl"], "step 1/1 | loss", 0),
    ("tokenizer is not a model", [*CORPUS, "--tokenizer_file", "{d}/garbage.safetensors"],
     "{d}/garbage.safetensors: not a valid sentencepiece model", 1),
    ("tokenizer.json is not one", [*CORPUS, "--tokenizer_file", "{d}/not_json.json"], "{d}/not_json.json: not a valid tokenizer.json", 1),
    ("tokenizer larger than vocab", ["--data", "corpus", "--vocab_size", "200"], "has 8000 pieces, config vocab_size is 200", 1),
    ("inference texts not UTF-8", ["infer_galaxy.py", "--texts", "{d}/latin1.txt"],
     "argument --texts: {d}/latin1.txt:2: not valid UTF-8 (byte 4)", 2),
    ("inference texts longer than seq_length", ["infer_galaxy.py", "--texts", "{d}/long.txt", "--vocab_size", "8000",
                                                "--requests", "2", "--warmup", "0"],
     "--texts {d}/long.txt: 1 of 2 lines are longer than seq_length 32 tokens and were cut to it (", 0),
    ("load_checkpoint missing", [*SYNTH, "--load_checkpoint", "{d}/no_model"], "{d}/no_model: no model.safetensors", 1),
    ("load_checkpoint corrupt", [*SYNTH, "--load_checkpoint", "{d}/garbage.safetensors"],
     "{d}/garbage.safetensors: not a readable safetensors file", 1),
    ("checkpoint has layers the model lacks", [*SYNTH, "--num_hidden_layers", "1", "--load_checkpoint", "{d}/ck"],
     "{d}/ck: 16 tensor(s) this model does not use: 'bert.encoder.layer.1.", 1),
    ("checkpoint lacks layers the model has", [*SYNTH, "--num_hidden_layers", "3", "--load_checkpoint", "{d}/ck"],
     "{d}/ck: 16 tensor(s) missing: 'bert.encoder.layer.2.", 1),
    ("unused tensors allowed with --strict false",
     [*SYNTH, "--num_hidden_layers", "1", "--load_checkpoint", "{d}/ck", "--strict", "false"],
     "--strict false: {d}/ck: 16 tensor(s) this model does not use: 'bert.encoder.layer.1.", 0),
    ("load_trainable saved with other tuning", [*SYNTH, "--use_lora", "true", "--load_trainable", "{d}/lora"],
     "load_trainable {d}/lora was saved with other tuning (tuning.json): lora_dim 4 there, 8 here", 2),
    ("load_trainable tensors of another shape", [*SYNTH, "--use_lora", "true", "--load_trainable", "{d}/lora/" + LORA_FILE],
     "8 tensor(s) of another shape: 'bert.encoder.layer.0.attention.self.query.lora_A' (parameter "
     "'bert.encoder.layer.0.attn.q.lora_A') is (4, 64) in the checkpoint, (8, 64) in the model", 1),
    ("load_trainable from another method", [*SYNTH, "--use_adapter", "true", "--load_trainable", "{d}/lora/" + LORA_FILE],
     "16 tensor(s) missing: 'bert.encoder.layer.0.con1.adapter.adapter_down.weight'", 1),
    ("resume with no checkpoint", [*SYNTH, "--save_dir", "{d}/empty_save", "--resume", "true"],
     "--resume: no complete checkpoint (step-*/manifest.json) in save_dir {d}/empty_save", 1),
    ("resume from a corrupted checkpoint", [*SYNTH, "--save_dir", "{d}/ck_bad", "--resume", "true"],
     "{d}/ck_bad/step-00000001/rank-00000.optim.safetensors: sha256 does not match", 1),
    ("resume with a changed config", [*SYNTH, "--save_dir", "{d}/ck", "--resume", "true", "--weight_decay", "0.5"],
     "the config differs from the checkpoint's in weight_decay: 0.01 -> 0.5", 1),
    ("elastic with --rank (one terminal per rank)", ["--world", "2", "--rank", "0", "--parallel", "galaxy", "--elastic"],
     "--elastic restarts the ranks of a one-command local spawn (--world N, no --rank); under torchrun use", 2),
    ("elastic without checkpoints", ["--world", "2", "--parallel", "galaxy", "--elastic"],
     "--elastic resumes from the latest training checkpoint: set save_every (and save_dir)", 2),
    ("elastic layout split two ways", ["--world", "4", "--parallel", "galaxy", "--data_parallel_size", "2", "--elastic",
                                       "--save_dir", "{d}/elastic", "--save_every", "1"],
     "--elastic: after losing a rank: --elastic re-plans layouts whose ranks split one way", 2),
    ("elastic_restarts 0", ["--elastic_restarts", "0"], "config key 'elastic_restarts' must be >= 1, got 0", 2),
    ("on_nonfinite not stop or skip", ["--on_nonfinite", "ignore"],
     "config key 'on_nonfinite' is 'ignore', expected one of ['stop', 'skip']", 2),
    ("loss becomes NaN", ["--lr", "1e9", "--max_grad_norm", "0", "--max_steps", "3"],
     "step 2: non-finite loss or gradient norm on some rank", 1),
    ("loss becomes NaN, with on_nonfinite skip", ["--lr", "1e9", "--max_grad_norm", "0", "--max_steps", "3",
                                                 "--on_nonfinite", "skip"],
     "on_nonfinite skip: 2 of the 3 steps run took no optimizer step", 0),
    ("save_dir is a file", [*SYNTH, "--save_dir", "{d}/not_json.json"], "save_dir {d}/not_json.json is not a directory", 1),
    ("metrics_file under a file", [*SYNTH, "--metrics_file", "{d}/not_json.json/m.jsonl"],
     "directory {d}/not_json.json is not a directory", 1),
    ("save_dir held by a running run", [*SYNTH, "--save_dir", "{d}/locked"],
     "save_dir {d}/locked is in use by another run: PID 1 on host", 1),
]


ANSWER = ["--texts", "{d}/texts.txt", "--output", "{d}/answers.jsonl"]
LLAMA = ["--config_file", "train_config/llama/full.json", "--num_key_value_heads", "2"]
BART = ["--config_file", "train_config/bart/full.json", "--vocab_size", "8000", "--data", "corpus"]
# infer_galaxy.py's cases; all stop before any rank starts
INFER_CASES = [
    ("--texts missing", ["--texts", "{d}/nope.txt"], "argument --texts: {d}/nope.txt is not a file", 2),
    ("--texts blank", ["--texts", "{d}/blank.txt"], "argument --texts: {d}/blank.txt has no text", 2),
    ("unknown --task", ["--task", "translate"], "argument --task: invalid choice: 'translate'", 2),
    ("--task without --output", ["--task", "embed", "--texts", "{d}/texts.txt"],
     "--task answers the lines of --texts into --output: give all three", 2),
    ("--output without --task", ANSWER, "--task answers the lines of --texts into --output: give all three", 2),
    ("--requests with --output", [*ANSWER, "--task", "embed", "--requests", "3"],
     "--requests: with --output every line of --texts is answered once", 2),
    ("--output is --texts", ["--texts", "{d}/texts.txt", "--output", "{d}/texts.txt", "--task", "embed"],
     "--output {d}/texts.txt is --texts: the answers would overwrite the questions", 2),
    ("--output is a directory", ["--texts", "{d}/texts.txt", "--output", "{d}/no_model", "--task", "embed"],
     "--output {d}/no_model is a directory", 2),
    ("--task the model cannot answer", [*ANSWER, "--task", "generate"],
     "--task: task 'generate' needs a llama model; this one is bert", 2),
    ("--top_k above the vocabulary", [*ANSWER, "--task", "fill-mask", "--top_k", "500"],
     "--top_k 500 exceeds vocab_size 200", 2),
    ("fill-mask with a tokenizer that has no mask", [*ANSWER, "--task", "fill-mask", "--vocab_size", "4000",
                                                    "--tokenizer_file", "data/python_docs/spm_llama.model"],
     "--task fill-mask: tokenizer data/python_docs/spm_llama.model has no mask token", 2),
    ("--serve not HOST:PORT", ["--serve", "8000"], "argument --serve: '8000' is not HOST:PORT (e.g. 127.0.0.1:8000)", 2),
    ("--serve with --task", ["--serve", "127.0.0.1:0", *ANSWER, "--task", "embed"],
     "--serve answers HTTP requests, not with --task, --output, --texts (a run over --texts)", 2),
    ("--serve on an address not this machine's", ["--serve", "192.0.2.1:8000"],
     "--serve 192.0.2.1:8000: cannot listen there", 2),
    ("generate past the model's positions", [*LLAMA, *ANSWER, "--task", "generate", "--max_new_tokens", "3000"],
     "--task generate: seq_length 32 (the longest prompt) + --max_new_tokens 3000 exceeds the model's 2048 positions", 2),
    ("--task the BART model cannot answer", [*BART, *ANSWER, "--task", "generate"],
     "--task: task 'generate' needs a llama model; this one is bart", 2),
    ("denoise past seq_length", [*BART, *ANSWER, "--task", "denoise", "--max_new_tokens", "33"],
     "--task denoise: --max_new_tokens 33 exceeds seq_length 32, the positions BART's decoder runs over", 2),
    ("denoise with a tokenizer that has no [CLS] / [SEP]", [*BART, *ANSWER, "--task", "denoise", "--vocab_size", "4000",
                                                          "--tokenizer_file", "data/python_docs/spm_llama.model"],
     "--task denoise: tokenizer data/python_docs/spm_llama.model has no [CLS] / [SEP], which frame what BART "
     "reconstructs", 2),
    ("--serve with a model no endpoint answers", [*BART, "--serve", "127.0.0.1:0"],
     "--serve: a bart model answers none of ['embed', 'generate']", 2),
    ("inference with --explain", ["--explain"], "--explain records a training step", 2),
    ("inference traced while it may re-plan", ["--world", "2", "--parallel", "galaxy", "--replan", "{}",
                                               "--trace_dir", "traces"],
     "--trace_dir traces the model a run starts with; replan and --elastic may rebuild it", 2),
]

CASES += [(what, ["infer_galaxy.py", *args], expected, code) for what, args, expected, code in INFER_CASES]

# finetune_retrieval.py's cases (its default config: MiniLM's shape, the shipped instruction pairs)
RETRIEVAL_NEGATIVES = "bert_retrieval scores each question against its batch's passages (in-batch negatives)"
RETRIEVAL_CASES = [
    ("retrieval with data-parallel replicas", ["--world", "2", "--data_parallel_size", "2"], RETRIEVAL_NEGATIVES, 2),
    ("retrieval in pipeline stages", ["--world", "2", "--parallel", "pp", "--stage_num_hidden_layers_list", "[1,1]"],
     RETRIEVAL_NEGATIVES, 2),
    ("retrieval checkpoint directory without weights", ["--load_checkpoint", "{d}/no_model"],
     "{d}/no_model: no model.safetensors, model.safetensors.index.json or .safetensors file found", 1),
    ("retrieval pairs without a target", ["--data_file", "{d}/pairs_no_target.jsonl"],
     "{d}/pairs_no_target.jsonl:1: missing key 'target'", 1),
    ("retrieval pairs fewer than a batch", ["--data_file", "{d}/two_pairs.jsonl"],
     "{d}/two_pairs.jsonl: 2 sequences of 32 tokens, fewer than one batch (batch_size 6)", 1),
]
RETRIEVAL = ["--config_file", "train_config/bert/retrieval/galaxy.json", "--data", "instruction", "--vocab_size", "8000",
             "--max_steps", "1"]
CASES += [(what, ["finetune_retrieval.py", *RETRIEVAL, *args], expected, code)
          for what, args, expected, code in RETRIEVAL_CASES]


def fill(items, d):
    return [str(x).replace("{d}", str(d)) for x in items]


def script_and_args(args):
    """(the entry script a case runs, its arguments)."""
    return (args[0], args[1:]) if args and args[0].endswith(".py") else ("pretrain_galaxy.py", args)


def run_in_process(args):
    """The entry script's exit code and output, run inside this process (no process group)."""
    out = io.StringIO()
    saved_argv = sys.argv
    script, args = script_and_args(args)
    sys.argv = [str(procs.ROOT / script), *procs.TINY, *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:  # like the interpreter: a string code is printed and exits 1
        code = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int) and e.code is not None:
            out.write(f"{e.code}\n")
    finally:
        sys.argv = saved_argv
    return code, out.getvalue()


def _message(code, output, expected=None):
    """The line of the output that holds the expected text; else the error, or the first step."""
    if expected and expected in output:
        return next(ln for ln in output.splitlines() if expected in ln)
    if code == 0:
        return next(ln for ln in output.splitlines() if "step 1/" in ln)
    lines = [ln for ln in output.strip().splitlines() if ln.startswith("galaxy:") or "error" in ln.lower()]
    return (lines or output.strip().splitlines() or [""])[-1]


def _row(what, args, code, output, expected=None):
    cell = _message(code, output, expected).replace("|", "\\|")
    return f"| {what} | `{' '.join(args)}` | {code} | {cell} |"


def table():
    """Run every case (and the multi-process failures) as real processes; return the Markdown."""
    rows = ["| bad input | arguments (besides a tiny model) | exit | message |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as d:
        write_files(d)
        for what, args, expected, _ in CASES:
            script, rest = script_and_args(fill(args, d))
            code, out = procs.run(rest, script=script)
            rows.append(_row(what, fill(args, d), code, out, fill([expected], d)[0]).replace(d, "DIR"))
        rows += _multi_process_rows(Path(d))
    return "\n".join(rows)


def _multi_process_rows(d):
    import signal
    import socket
    rows = []
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        args = ["--world", "2", "--rank", "0", "--master_port", str(taken.getsockname()[1]), "--max_steps", "1"]
        code, out = procs.run(args)
        rows.append(_row("port already in use", args, code, out))
    ranks = procs.start_ranks(2, ["--parallel", "galaxy", "--max_steps", "1"], d, ranks=[0])
    code = procs.finish(ranks, 120)[0]
    rows.append(_row("rank 1 never starts (rank 0's view)", ["--world", "2", "--rank", "0"], code, (d / "rank0.log").read_text()))
    port = procs.free_port()
    ranks = {r: procs.start(["--parallel", "galaxy", "--world", "2", "--rank", str(r), "--master_port", str(port),
                             "--max_steps", "1", "--lr", str(0.001 * (r + 1))], d / f"rank{r}.log") for r in range(2)}
    code = procs.finish(ranks, 120)[0]
    rows.append(_row("ranks started with different configs (rank 0's view)", ["--world 2 --rank R --lr 0.00(R+1)"], code,
                     (d / "rank0.log").read_text()))
    ranks = procs.start_ranks(2, ["--parallel", "galaxy", "--max_steps", "100000"], d)
    procs.wait_for(d / "rank0.log", "step 1/", ranks[0])
    ranks[1].send_signal(signal.SIGKILL)
    code = procs.finish(ranks, 120)[0]
    rows.append(_row("rank 1 SIGKILLed mid-training (rank 0's view)", ["--world", "2", "--rank", "0"], code,
                     (d / "rank0.log").read_text()))
    spawn = procs.start(["--parallel", "galaxy", "--world", "2", "--max_steps", "3"], d / "spawn.log",
                        "tests/scripts/patched_steps.py", env={"GALAXY_TEST_KILL": "1,1,2"})
    code = procs.finish({0: spawn}, 120)[0]
    rows.append(_row("rank 1 SIGKILLed in a local spawn (the launcher's view)", ["--world", "2"], code,
                     (d / "spawn.log").read_text()))
    return rows


if __name__ == "__main__":
    print("# Bad inputs and what they get\n\nMade by `python -m tests.app.bad_inputs > docs/bad_inputs.md` "
          "(each row run as a real process; DIR is a temporary directory). "
          "Documents longer than seq_length are not an error: the corpus is one token stream cut into "
          "seq_length pieces, so nothing is skipped (only the tail shorter than one sequence is dropped). Exit 2 = rejected by the command line / "
          "config check before any process starts training; 1 = a runtime error with a message naming the "
          "file, key or rank.\n")
    print("Keys that do nothing under the rest of the config (set to other than their default): "
          "`zero_shard_list` or `memory_mb` without `zero_stage` is an error (the run would silently be plain "
          "data parallelism); these warn (`galaxy: warning: ...`, the run goes on: the prototype's flat configs "
          "carry them out of habit, and a layout's recipe run at world 1 is the serial reference): another tuning "
          "method's keys; split lists the layout does not use (`tp_num_attention_heads_list` without TP attention, "
          "`tp_intermediate_size_list` without a TP MLP, `seq_scatter_list` without a sequence-split block); "
          "pipeline keys without stages (`stage_num_hidden_layers_list`, `num_microbatches`, `pipeline_schedule`, "
          "`virtual_stages`); any layout key at world 1; `keep_checkpoints` without `save_every`; "
          "`elastic_restarts` without `elastic`.\n")
    print("A one-command local spawn (`--world N`, no `--rank`) says how many ranks share how many CPU cores, "
          "warns when their threads outnumber the cores, and refuses more than 4 ranks a core (exit 2); "
          "while ranks join, rank 0 says every 10 s how many have.\n")
    print(table())
