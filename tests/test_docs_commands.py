"""Every command in README.md and docs/*.md code blocks runs as written (issue 26, item 4), with the
tiny overrides and the block markers tests/doc_commands.py describes; blocks marked as needing
root, a GPU or minutes are reported as skipped, with the reason."""
import importlib
import json
import os
import re
import socket
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from tests.doc_commands import REPO, argv_of, blocks, doc_blocks, plan, program, tiny, work_dir

BLOCKS = doc_blocks()
RUNS = plan(BLOCKS)
TIMEOUT_S = 300  # per block; a command runs in seconds


class Runner:
    """The fork-per-command runner process (tests.doc_commands serve)."""

    def __init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torch reads it once, at import: one core per process
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.doc_commands", "serve"], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def run(self, runs, timeout_s):
        self.proc.stdin.write(json.dumps({"runs": runs, "timeout_s": timeout_s}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["codes"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def runner():
    r = Runner()
    yield r
    r.close()


def requirements(args):
    """What `pip install args` names: its requirements, and for `-e PATH[extras]` PATH's
    pyproject dependencies and those extras."""
    out, editable = [], False
    for a in args:
        if a == "-e":
            editable = True
        elif not a.startswith("-") and editable:
            path, _, extras = a.partition("[")
            project = tomllib.loads((REPO / path / "pyproject.toml").read_text())["project"]
            out += project["dependencies"]
            out += [r for extra in filter(None, extras.rstrip("]").split(",")) for r in project["optional-dependencies"][extra]]
            editable = False
        elif not a.startswith("-"):
            out.append(a)
    return out


def check_installed(args):
    """pip install is not run by a test: what it names must be installed, at the version it pins."""
    for requirement in requirements(args):
        name, pinned = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0], requirement.partition("==")[2]
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"pip install {' '.join(args)}: {name} is not installed")
        assert not pinned or version.split("+")[0] == pinned, f"{name} {version} is installed, {pinned} pinned"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _show(log, lines=40):
    text = Path(log).read_text(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


@pytest.mark.parametrize("block", [b for b in BLOCKS if not b.skip_reason], ids=lambda b: b.id)
def test_documented_commands_run(block, runner, tmp_path):
    cwd = work_dir(tmp_path)
    runs = []
    for i, argv in enumerate(RUNS[block.id]):
        if argv[0] == "pip":
            check_installed(argv[2:])
            continue
        port = str(free_port())  # one terminal per rank: the launcher's environment gives the port
        runs.append({"argv": argv, "cwd": str(cwd), "env": {"MASTER_PORT": port, "PET_MASTER_PORT": port},
                     "log": str(tmp_path / f"command-{i}.log")})
    if block.together:
        port = runs[0]["env"]["MASTER_PORT"]
        for run in runs:
            run["env"].update(MASTER_PORT=port, PET_MASTER_PORT=port)
        batches = [runs]
    else:
        batches = [[run] for run in runs]
    for batch in batches:
        codes = runner.run(batch, TIMEOUT_S)
        for run, code in zip(batch, codes, strict=True):
            assert code == 0, f"{block.id}: `{' '.join(run['argv'])}` exited {code}:\n{_show(run['log'])}"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.skip_reason], ids=lambda b: b.id)
def test_marked_blocks_are_skipped_with_their_reason(block):
    if block.skip_reason == "the test suite":  # what the README says CI runs, CI runs
        ci = (REPO / ".ci" / "run").read_text().splitlines()
        assert all(c in ci for c in block.commands), f"{block.id}: {block.commands} not in .ci/run"
        return
    pytest.skip(f"{block.id}: {block.marker}")


def test_commands_that_need_root_are_marked():
    for block in BLOCKS:
        if any(c.startswith("sudo ") for c in block.commands):
            assert block.skip_reason == "needs root", f"{block.id}: sudo in a block not marked 'needs root'"


def test_every_marker_is_known():
    markers = [b.marker for b in BLOCKS if b.marker]
    assert markers and all(b.skip_reason or b.together for b in BLOCKS if b.marker), markers


def test_blocks_commands_and_markers_are_read_as_documented():
    text = "\n".join([
        "Intro", "", "    python a.py --x 1   # a comment", "    [rank 0] output, not a command", "",
        "    python b.py \\", "        --y 2", "", "  - item", "", "  <!-- commands: together (one terminal each) -->",
        "      python c.py --rank 0", "      python c.py --rank 1", "", "<!-- commands: needs root -->",
        "```", "sudo python -m d", "```", "text", "    not code: a paragraph's continuation"])
    found = blocks(text)
    assert [(b.line, b.marker, b.commands) for b in found] == [
        (3, None, ["python a.py --x 1   # a comment", "python b.py --y 2"]),
        (12, "together (one terminal each)", ["python c.py --rank 0", "python c.py --rank 1"]),
        (17, "needs root", ["sudo python -m d"])]
    assert argv_of("pip install torch==2.13.0 && python a.py --x 1  # why") == [
        ["pip", "install", "torch==2.13.0"], ["python", "a.py", "--x", "1"]]
    assert program(["torchrun", "--nproc_per_node", "2", "pretrain_galaxy.py"]) == "pretrain_galaxy.py"
    assert tiny(["python", "pretrain_galaxy.py", "--max_steps", "20"])[-1] == "2"
    assert tiny(["python", "pretrain_galaxy.py", "--max_steps", "6", "--resume", "true"])[3] == "6"
    assert tiny(["python", "pretrain_galaxy.py", "--explain"]) == ["python", "pretrain_galaxy.py", "--explain"]
    assert tiny(["python", "infer_galaxy.py", "--requests", "50"])[3:] == ["2", "--warmup", "0"]


def test_the_quick_start_is_found_and_run():
    first = next(b for b in BLOCKS if b.path == "README.md")
    assert first.commands[0].startswith("pip install torch==") and not first.skip_reason
    assert ["python", "pretrain_galaxy.py"] == RUNS[first.id][-1][:2]


def _anchor(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_docs_resolve():
    """Every relative link in README.md and docs/*.md names a file that exists, and a heading in it."""
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            assert file.exists(), f"{doc.relative_to(REPO)}: link {target}: no such file"
            if anchor:
                headings = [_anchor(h) for h in re.findall(r"^#+ (.*)$", file.read_text(), re.M)]
                assert anchor in headings, f"{doc.relative_to(REPO)}: link {target}: no such heading"


def _resolves(dotted):
    """Whether `galaxy.a.b.c` is a module, or an attribute path inside one."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name, None)
        return obj is not None
    return False


def test_files_and_modules_the_docs_name_exist():
    """A file path (galaxy/..., tests/..., train_config/...) or a `galaxy.x.y` name in README.md or
    docs/*.md that a move or a rename left behind is an error."""
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text()
        for path in set(re.findall(r"(?<![\w/.])((?:galaxy|tests|benchmarks|tools|train_config|data)/[\w/.-]*\w\.\w+)", text)):
            assert (REPO / path).exists(), f"{doc.relative_to(REPO)} names {path}, which does not exist"
        for dotted in set(re.findall(r"(?<![\w/.])galaxy(?:\.[a-z_]\w*)+", text)):
            if not re.search(r"\.(py|json|md|svg)$", dotted):
                assert _resolves(dotted), f"{doc.relative_to(REPO)} names {dotted}, which does not import"


def test_the_readmes_repository_map_names_every_entry_of_the_package():
    """Every folder and module directly in galaxy/ is on the README's map (issue 24)."""
    readme = (REPO / "README.md").read_text()
    entries = sorted(p.name for p in (REPO / "galaxy").iterdir()
                     if p.name != "__init__.py" and (p.suffix == ".py" or (p / "__init__.py").exists()
                                                      or (p / "__main__.py").exists()))
    assert entries and [e for e in entries if f"galaxy/{e}" not in readme] == []
