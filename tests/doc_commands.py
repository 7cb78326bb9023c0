"""The shell commands in README.md and docs/*.md code blocks, and a runner that runs them cheaply.

A command is a line of a code block (fenced, or indented four spaces) that starts with `python`,
`torchrun`, `pip` or `sudo`; a trailing backslash continues it on the next line, and `# ...` ends
it. Other lines in code blocks (printed output, comments) are not commands.

A comment on the line just above a block says how it is treated:

    <!-- commands: together (one terminal each) -->   its commands start at once (one per rank)
    <!-- commands: needs root -->                     not run here (network namespaces, tc)
    <!-- commands: needs a GPU -->                    not run here
    <!-- commands: slow (minutes) -->                 not run here (a benchmark)
    <!-- commands: the test suite itself ... -->      not run; .ci/run must run it

Every other block runs, its commands in order, in a fresh directory holding links to the
repository's files (so `out/`, `traces/`, `ckpt/` land there), with tiny overrides: a training
run stops after `--max_steps 2` (a given `--max_steps` of at most MAX_STEPS_KEPT is kept, so a
resume example keeps its steps) and, unless it sets them or splits the positions, takes batch 8 and
sequence 48 (SIZES); inference serves 2 requests, generation makes 4 tokens, the planner checks
its candidates in at most 3 rounds. `pip install` is checked instead of run: what it names must be
installed. A command already run by an earlier block is run again only when a later command of its
block may read what it wrote.

The runner (`python -m tests.doc_commands serve`) imports torch once and forks a process per
command, which runs the script as `python` would (runpy: `__main__`, sys.argv, sys.path);
the ranks a local spawn starts are forked from it too (the `spawn` start method is mapped to
`fork` in that process only), so no command pays torch's import again. torchrun, and anything
not `python`, is exec'd as written.
"""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIRST_WORDS = ("python", "torchrun", "pip", "sudo")
MARKER = re.compile(r"^\s*<!--\s*commands:\s*(.*?)\s*-->\s*$")
SKIPS = ("needs root", "needs a GPU", "slow", "the test suite")  # a marker starting with one of these
TOGETHER = "together"
TRAINING = {"pretrain_galaxy.py", "pretrain_bart.py", "finetune_llama.py", "finetune_retrieval.py", "pretrain_bert.py",
            "pretrain_tp_bert.py", "pretrain_dp_bert.py", "pretrain_sp_bert.py", "pretrain_pp_bert.py",
            "finetune_pp_llama.py"}
MAX_STEPS_KEPT = 8
# a training command's batch and sequence, unless it sets them: 8 samples split over the shipped
# layouts' replicas and micro-batches (up to 2 x 4), and every instruction prompt (at most 39
# tokens) leaves an answer token in 48
SIZES = {"--batch_size": "8", "--seq_length": "48"}
TINY = {"infer_galaxy.py": {"--requests": "2", "--warmup": "0"}, "generate.py": {"--max_new_tokens": "4"},
        "galaxy.planner": {"--repeats": "3"}}


@dataclass
class Block:
    path: str  # relative to the repository
    line: int  # of the block's first line
    marker: str | None
    commands: list = field(default_factory=list)  # [str], continuation lines joined

    @property
    def id(self):
        return f"{self.path}:{self.line}"

    @property
    def skip_reason(self):
        return next((s for s in SKIPS if self.marker and self.marker.startswith(s)), None)

    @property
    def together(self):
        return bool(self.marker) and self.marker.startswith(TOGETHER)


def doc_files():
    return [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))


def blocks(text, path="doc.md"):
    """The code blocks of a markdown text that hold at least one command. A marker applies to
    the block after it (blank lines may come between); an indented block runs on across blank
    lines until a line indented less."""
    out, current, fenced, marker, previous_blank = [], None, False, None, True
    for number, line in enumerate(text.split("\n"), start=1):
        stripped = line.strip()
        if fenced:
            if stripped.startswith("```"):
                fenced, current = False, None
            else:
                current.commands.append(line)
        elif stripped.startswith("```"):
            fenced, current, marker = True, Block(path, number + 1, marker), None
            out.append(current)
        elif MARKER.match(line):
            marker, current = MARKER.match(line).group(1), None
        elif re.match(r" {4,}\S", line) and (current is not None or previous_blank or marker):
            if current is None:
                current, marker = Block(path, number, marker), None
                out.append(current)
            current.commands.append(line)
        elif stripped:
            current, marker = None, None
        previous_blank = not stripped
    for block in out:
        block.commands = _commands(block.commands)
    return [b for b in out if b.commands]


def _commands(lines):
    """Command lines of a block, continuations joined, comments and other lines dropped."""
    joined, pending = [], ""
    for line in lines:
        text = pending + line.strip()
        if text.endswith("\\"):
            pending = text[:-1].rstrip() + " "
            continue
        pending = ""
        joined.append(text)
    return [c for c in joined if c.split(" ", 1)[0] in FIRST_WORDS]


def doc_blocks():
    return [b for f in doc_files() for b in blocks(f.read_text(), str(f.relative_to(REPO)))]


def argv_of(command):
    """The command's parts between `&&`, each as argv (shell comments dropped)."""
    words = shlex.split(command, comments=True)
    parts, current = [], []
    for w in words:
        if w == "&&":
            parts.append(current)
            current = []
        else:
            current.append(w)
    return parts + [current]


def program(argv):
    """What an argv runs: the script, `-m` module, or executable."""
    if argv[0] == "python":
        return argv[2] if argv[1] == "-m" else argv[1]
    if argv[0] == "torchrun":
        return next(a for a in argv[1:] if not a.startswith("-") and not a.isdigit())
    return argv[0]


def _set(argv, flag, value, keep_up_to=None):
    """argv with `flag value`: appended where not given, replaced where given (but a given value
    of at most keep_up_to is kept)."""
    if flag in argv:
        i = argv.index(flag) + 1
        if keep_up_to is None or int(argv[i]) > keep_up_to:
            argv = argv[:i] + [value] + argv[i + 1:]
        return argv
    return argv + [flag, value]


def _config_of(argv):
    return next((argv[argv.index(f) + 1] for f in ("--config_file", "--config") if f in argv), None)


def _resizable(argv):
    """Whether a training command may take SIZES: it sets no size itself, and no split of the
    positions (on its command line or in its config) fixes the sequence length."""
    from galaxy.config.load import load_config
    if any(f in argv for f in (*SIZES, "--seq_scatter_list")) or _config_of(argv) is None:
        return False
    return not load_config(str(REPO / _config_of(argv)), {}).get("seq_scatter_list")


def tiny(argv):
    """argv with the overrides that keep it short (see the module docstring)."""
    name = program(argv)
    if name in TRAINING and "--explain" not in argv:
        argv = _set(argv, "--max_steps", "2", keep_up_to=MAX_STEPS_KEPT)
        for flag, value in SIZES.items() if _resizable(argv) else ():
            argv = _set(argv, flag, value)
    for flag, value in TINY.get(name, {}).items():
        argv = _set(argv, flag, value)
    return argv


def plan(all_blocks):
    """{block id: [argv runs]} for the blocks to run, duplicates of earlier runs left out
    unless a later command of their block follows them."""
    seen, out = set(), {}
    for block in all_blocks:
        if block.skip_reason:
            continue
        runs = [tiny(argv) for command in block.commands for argv in argv_of(command)]
        keep = []
        for i, argv in enumerate(runs):
            key = tuple(argv)
            if key in seen and i == len(runs) - 1 and not block.together:
                continue
            seen.add(key)
            keep.append(argv)
        out[block.id] = keep
    return out


def work_dir(tmp):
    """A directory linking the repository's top-level files (those git tracks, so nothing a user
    wrote there, like out/), for a block's commands to write in."""
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True).stdout.split()
    names = {t.split("/", 1)[0] for t in tracked} or {p.name for p in REPO.iterdir() if not p.name.startswith(".")}
    for name in sorted(names):
        if (REPO / name).exists():
            (Path(tmp) / name).symlink_to(REPO / name)
    return Path(tmp)


# ---- the runner (a process of its own: it imports torch once and forks one child per command)

def _run_python(argv):
    """Run `python ...` argv here as the interpreter would; returns the exit code."""
    import runpy
    if argv[1] == "-c":
        sys.argv = ["-c"] + argv[3:]
        sys.path.insert(0, "")
        exec(compile(argv[2], "<string>", "exec"), {"__name__": "__main__"})
    elif argv[1] == "-m":
        sys.argv = [argv[2]] + argv[3:]
        sys.path.insert(0, os.getcwd())
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv[1:]
        sys.path.insert(0, str(Path(argv[1]).resolve().parent))
        runpy.run_path(argv[1], run_name="__main__")
    return 0


def _exit_code(value):
    """The exit status of SystemExit(value), as the interpreter makes it."""
    if value is None or isinstance(value, int):
        return value or 0
    print(value, file=sys.stderr)
    return 1


def _child(argv, cwd, env, log):
    os.setpgid(0, 0)  # the runner ends the command and every process it started as one group
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the runner's requests are not the command's input
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.chdir(cwd)
    os.environ.update(env)
    if argv[0] != "python":
        os.execvp(argv[0], argv)
    import multiprocessing.context
    contexts = multiprocessing.context._concrete_contexts
    contexts["spawn"] = contexts["fork"]  # ranks start without importing torch again
    try:
        code = _run_python(argv)
    except SystemExit as e:
        code = _exit_code(e.code)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _start(run):
    pid = os.fork()
    if pid == 0:
        try:
            _child(run["argv"], run["cwd"], run["env"], run["log"])
        finally:
            os._exit(70)
    return pid


def _wait(pids, timeout_s):
    """Exit codes of pids (-9 for one still running after timeout_s, whose group is killed)."""
    codes, deadline = {}, time.monotonic() + timeout_s
    while len(codes) < len(pids):
        for pid in pids:
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            for pid in pids:
                if pid not in codes:
                    os.killpg(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    codes[pid] = -9
        time.sleep(0.05)
    for pid in pids:  # whatever a command left behind (a rank it never reaped) ends with it
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return [codes[pid] for pid in pids]


def serve():
    """Read one JSON request a line: {"runs": [{argv, cwd, env, log}], "timeout_s"}; start the runs
    at once, answer {"codes": [...]} when all have ended."""
    import torch  # noqa: F401  imported once, here, for every command
    import torch._dynamo  # noqa: F401  (torch's optimizers import it on first use: 2 s a rank)
    import galaxy.models.registry  # noqa: F401
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pids = [_start(run) for run in request["runs"]]
        print(json.dumps({"codes": _wait(pids, request["timeout_s"])}), flush=True)


if __name__ == "__main__" and sys.argv[1:] == ["serve"]:
    serve()
