"""DESIGN.md's import rule, read from the import graph: layers import only downwards."""

import ast
import pathlib

LAYERS = ["config", "sharding", "models", "interop", "data", "checkpoint", "infer", "slim", "train", "cli"]
ROOT = pathlib.Path(__file__).resolve().parent.parent / "slimjax"


def layer_of(module: str):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "slimjax" and parts[1] in LAYERS else None


def imports_of(path: pathlib.Path, root: pathlib.Path):
    """Absolute slimjax module names imported by a file (relative imports resolved)."""
    package = ".".join(("slimjax",) + path.relative_to(root).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            yield module
            yield from (f"{module}.{a.name}" for a in node.names)


def violations(root: pathlib.Path) -> list[str]:
    """Every import in the package under ``root`` that points to a later layer."""
    found = []
    for path in sorted(root.rglob("*.py")):
        mine = layer_of("slimjax." + ".".join(path.relative_to(root).with_suffix("").parts))
        if mine is None:
            continue
        for module in imports_of(path, root):
            theirs = layer_of(module)
            if theirs and LAYERS.index(theirs) > LAYERS.index(mine):
                found.append(f"{path.relative_to(root)} imports {module} ({mine} -> {theirs})")
    return found


def test_every_import_points_down_the_layers():
    assert len(list(ROOT.rglob("*.py"))) > 10
    assert violations(ROOT) == []


def test_models_never_see_a_mesh():
    for path in (ROOT / "models").rglob("*.py"):
        source = path.read_text()
        for word in ("Mesh", "NamedSharding", "PartitionSpec", "make_mesh", "'fsdp'", '"fsdp"', '"tensor"'):
            assert word not in source, f"{path.name} mentions {word}"


def test_the_checker_catches_upward_imports(tmp_path):
    """The rule is not vacuous: upward imports (absolute and relative) are reported."""
    pkg = tmp_path / "slimjax"
    (pkg / "models").mkdir(parents=True)
    (pkg / "models" / "probe.py").write_text("from slimjax.train import loop\nfrom ..cli import main\n")
    (pkg / "cli.py").write_text("from slimjax.models import probe\n")  # downward: fine
    found = violations(pkg)
    assert found == ["models/probe.py imports slimjax.train (models -> train)",
                     "models/probe.py imports slimjax.train.loop (models -> train)",
                     "models/probe.py imports slimjax.cli (models -> cli)",
                     "models/probe.py imports slimjax.cli.main (models -> cli)"]


def duplicate_definitions(root: pathlib.Path) -> list[str]:
    """Functions or methods defined twice in one module or class body (the first is silently dead;
    a merge that adds the same method on two branches produces exactly this)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for scope in ast.walk(ast.parse(path.read_text())):
            if not isinstance(scope, (ast.Module, ast.ClassDef)):
                continue
            seen = set()
            for node in scope.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    if node.name in seen:
                        found.append(f"{path.relative_to(root)}: {node.name} (line {node.lineno})")
                    seen.add(node.name)
    return found


def test_no_function_is_defined_twice_in_one_scope(tmp_path):
    assert duplicate_definitions(ROOT) == []
    probe = tmp_path / "probe.py"
    probe.write_text("class A:\n    def f(self): ...\n    def f(self): ...\n")
    assert duplicate_definitions(tmp_path) == ["probe.py: f (line 3)"]
