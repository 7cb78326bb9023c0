"""The import rules of docs/architecture.md, read from the source: every import statement of every
module under galaxy/ (those inside functions too: a deferred import is still a dependency), each
checked against the rules below. A rule names the package it binds and the packages it must never
import; a break is reported with the module, the line and the imported name."""
import ast
import re
from pathlib import Path

import pytest

GALAXY = Path(__file__).resolve().parents[1] / "galaxy"

# (who, what it never imports, why)
RULES = [
    ("galaxy", ("galaxy.app",), "the engine never imports the application"),
    ("galaxy.app.infer", ("galaxy.train", "galaxy.app.train"), "inference never imports training"),
    ("galaxy.inference", ("galaxy.train",), "inference never imports training"),
    ("galaxy.planner", ("galaxy.train", "galaxy.runtime", "galaxy.config"),
     "the planner splits a model from a config dict: no training, no processes"),
    ("galaxy.models", ("galaxy.data", "galaxy.tuning", "galaxy.train", "galaxy.pipeline"),
     "one definition per architecture; data, tuning methods and schedules are applied to it"),
    ("galaxy.comm", ("galaxy.runtime", "galaxy.layers", "galaxy.models", "galaxy.pipeline", "galaxy.train"),
     "comm moves tensors between ranks: no processes, no blocks or models"),
    ("galaxy.layers", ("galaxy.models", "galaxy.tuning", "galaxy.pipeline", "galaxy.train"),
     "blocks know their slice of a layer, not the model, tuning method or schedule around them"),
    ("galaxy.pipeline", ("galaxy.models", "galaxy.train", "galaxy.runtime", "galaxy.planner"),
     "schedules run any stage's forward and backward; the trainer hands them in"),
    ("galaxy.train", ("galaxy.runtime", "galaxy.planner", "galaxy.profiler", "galaxy.config", "galaxy.reshard"),
     "the training loop takes a model, a context and a config dict: no processes, no planning"),
    ("galaxy.data", ("galaxy.comm", "galaxy.layers", "galaxy.models", "galaxy.train", "galaxy.tuning"),
     "datasets are tokens; what a rank holds of a batch is the trainer's business"),
    ("galaxy.runtime", ("galaxy.layers", "galaxy.models", "galaxy.pipeline", "galaxy.profiler", "galaxy.data"),
     "processes and their losses do not depend on the model they run"),
    ("galaxy.profiler", ("galaxy.runtime",), "a recorded meta step starts no process"),
    ("galaxy.config", ("galaxy.train", "galaxy.runtime", "galaxy.planner", "galaxy.profiler", "galaxy.pipeline"),
     "a config is read and checked before anything runs"),
]
# docs/architecture.md's picture, top to bottom: a package imports only those under it
STACK = ["galaxy.app", "galaxy.runtime", "galaxy.planner", "galaxy.profiler", "galaxy.reshard", "galaxy.inference",
         "galaxy.train", "galaxy.config", "galaxy.tuning", "galaxy.loralib", "galaxy.adapters", "galaxy.pipeline",
         "galaxy.models", "galaxy.data", "galaxy.layers", "galaxy.comm", "galaxy.plan", "galaxy.keys", "galaxy.errors",
         "galaxy.seeding"]
# the `python -m galaxy.X` commands the documentation names: thin shims into galaxy.app
COMMAND_SHIMS = {"galaxy.planner.__main__", "galaxy.memory.__main__"}


def module_name(path):
    parts = path.relative_to(GALAXY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path):
    """[(line, imported name)] of one file: `import a.b` gives a.b, `from a import b` gives a and a.b
    (b may be a module), relative imports resolved against the file's package."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


MODULES = {module_name(p): p for p in sorted(GALAXY.rglob("*.py"))}


def within(name, package):
    return name == package or name.startswith(package + ".")


def offending(path, is_bad):
    """'file:line imports name' for each line of `path` importing a name is_bad(name) refuses."""
    hits = {}  # line -> the longest refused name it imports (`from a import b` gives a and a.b)
    for line, name in imports(path):
        if is_bad(name):
            hits[line] = max(hits.get(line, ""), name, key=len)
    return [f"{path.relative_to(GALAXY.parent)}:{line} imports {name}" for line, name in sorted(hits.items())]


def breaks(rule):
    who, never, _ = rule
    out = []
    for module, path in MODULES.items():
        if not within(module, who) or module in COMMAND_SHIMS or (who == "galaxy" and within(module, "galaxy.app")):
            continue
        out += offending(path, lambda name: any(within(name, bad) for bad in never))
    return out


@pytest.mark.parametrize("rule", RULES, ids=[f"{who} never imports {', '.join(never)}" for who, never, _ in RULES])
def test_rule_holds(rule):
    found = breaks(rule)
    assert not found, f"{rule[2]}:\n" + "\n".join(found)


def level(name):
    return next((i for i, package in enumerate(STACK) if within(name, package)), None)


def test_each_package_imports_only_those_under_it():
    up = []
    for module, path in MODULES.items():
        if module not in COMMAND_SHIMS and level(module) is not None:
            up += offending(path, lambda name: level(name) is not None and level(name) < level(module))
    assert not up, "docs/architecture.md's picture puts these above their importer:\n" + "\n".join(up)
    assert [m for m in MODULES if level(m) is None and m not in COMMAND_SHIMS] == ["galaxy"]  # every package placed


def test_rules_name_packages_that_exist():
    """A renamed package must not leave a rule checking nothing."""
    packages = {m for m, p in MODULES.items() if p.name == "__init__.py"} | set(MODULES)
    named = {who for who, _, _ in RULES} | {bad for _, never, _ in RULES for bad in never} | COMMAND_SHIMS | set(STACK)
    assert sorted(n for n in named if n not in packages) == []


def test_the_walk_sees_imports():
    """The walk finds what the application is known to import: plain, from-, aliased and relative
    imports, and a break planted in a rule's package is reported."""
    train_app = {name for _, name in imports(GALAXY / "app" / "train.py")}
    assert {"galaxy.train.loop", "galaxy.runtime.launch", "galaxy.app.cli"} <= train_app
    assert "galaxy.data.denoising" in {name for _, name in imports(GALAXY / "data" / "__init__.py")}
    planted = ("galaxy.comm", ("galaxy.comm.stats",), "planted")  # collectives.py imports stats
    assert any("galaxy/comm/collectives.py" in b for b in breaks(planted))


def process_state(path):
    """Module-level names a function rebinds (`global`) or bound to a mutable {} / [] / set()."""
    tree = ast.parse(path.read_text())
    rebound = {name for node in ast.walk(tree) if isinstance(node, ast.Global) for name in node.names}
    mutable = {target.id for node in tree.body if isinstance(node, ast.Assign)
               and (isinstance(node.value, (ast.Dict, ast.List, ast.Set))
                    or (isinstance(node.value, ast.Call) and ast.unparse(node.value.func) == "set"))
               for target in node.targets if isinstance(target, ast.Name)}
    return {(str(path.relative_to(GALAXY.parent)), name) for name in rebound | mutable
            if not name.isupper() and not name.startswith("__")}  # constants and __all__ do not change


def test_process_wide_state_is_the_documented_one():
    """docs/architecture.md's "Process-wide state" table names every module-level value that changes."""
    doc = (GALAXY.parent / "docs" / "architecture.md").read_text()
    documented = set(re.findall(r"^\| (galaxy/\S+\.py) \| `(\w+)` \|", doc, re.M))
    found = set().union(*(process_state(path) for path in MODULES.values()))
    assert sorted(found) == sorted(documented)

