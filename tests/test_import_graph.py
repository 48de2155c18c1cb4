"""The package's import graph: no cycles (imports inside functions count too) and no `_private`
name imported from another package module (shared means public)."""

from __future__ import annotations

import ast
from pathlib import Path

import reflectune_hf

PACKAGE = "reflectune_hf"
ROOT = Path(reflectune_hf.__file__).parent


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (subpackages included)."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, modules: dict) -> tuple[set, list]:
    """(package modules `module` imports anywhere in its file, `(target, name)` private names)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    targets, privates = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    targets.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, is_package, node)
            if not source.startswith(PACKAGE):
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in modules:  # `from .pkg import submodule`: an import of the submodule
                    targets.add(sub)
                    continue
                if source in modules:  # a name defined in `source`
                    targets.add(source)
                if alias.name.startswith("_") and not alias.name.startswith("__") and source != module:
                    privates.append((source, alias.name))
    targets.discard(module)
    return targets, privates


def import_graph() -> tuple[dict, dict]:
    modules = module_files()
    graph, privates = {}, {}
    for name, path in modules.items():
        graph[name], found = imports_of(name, path, modules)
        if found:
            privates[name] = found
    return graph, privates


def find_cycle(graph: dict) -> list | None:
    """One cycle of `graph` as a list of nodes (first == last), or None."""
    state: dict = {}
    stack: list = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_graph_sees_relative_function_level_and_submodule_imports():
    graph, _ = import_graph()
    assert "reflectune_hf.models" in graph["reflectune_hf.scoring.ifd"]  # `from .models import ...`
    assert len(graph) > 20 and any(graph.values())


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    graph, _ = import_graph()
    # The package root re-exports the public API, so a module importing a name from the root
    # (`from . import __version__`) closes a cycle too: read it with `utils.package_version()`.
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_names_imported_across_modules():
    _, privates = import_graph()
    found = {(m, src, name) for m, pairs in privates.items() for src, name in pairs}
    new = sorted(found)
    assert not new, "private names imported from other modules (make them public in one home): " + "; ".join(
        f"{m} imports {src}.{name}" for m, src, name in new)


BASE = {"utils", "sanitize", "prompts", "data", "models"}
METHOD_PACKAGES = {"reflection", "scoring", "selection", "tuna", "training", "evaluation", "publishing"}


def _part(module: str) -> str:
    """`reflectune_hf.scoring.ifd` -> `scoring`; the root -> `` (the public API)."""
    return module.split(".")[1] if module.count(".") else ""


def package_graph() -> dict:
    """The import graph collapsed to the package's top-level parts (`oracles`, `scoring`, `cli`, ...)."""
    graph, _ = import_graph()
    parts: dict = {}
    for module, targets in graph.items():
        src = _part(module)
        if not src or src == "__main__":
            continue
        parts.setdefault(src, set()).update(t for t in map(_part, targets) if t and t != src)
    return parts


def test_data_flows_one_way_between_parts():
    """The CLI and jobs import stages; stages import oracles, prompts and data; nothing imports the CLI."""
    graph = package_graph()
    assert {"oracles", "reflection", "scoring", "cli"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "cycle between parts of the package: " + " -> ".join(cycle)
    assert not [p for p, targets in graph.items() if "cli" in targets and p != "cli"], "only the CLI imports the CLI"
    for low in BASE | {"oracles"}:
        wrong = graph.get(low, set()) & (METHOD_PACKAGES | {"cli"})
        assert not wrong, f"{low} imports {sorted(wrong)}: a method or the CLI imports it, not the other way"


def test_the_method_is_visible_in_the_tree():
    """No flat module left beside the subpackages but the shared base and the public API."""
    flat = {p.stem for p in ROOT.glob("*.py")} - {"__init__", "__main__"}
    assert flat <= BASE, f"modules outside a subpackage: {sorted(flat - BASE)}"


def _declared_distributions() -> set:
    """Distribution names in setup.cfg's install_requires and extras (normalised)."""
    import configparser
    import re

    cfg = configparser.ConfigParser()
    cfg.read(ROOT.parent / "setup.cfg")
    text = cfg["options"]["install_requires"] + "\n" + "\n".join(cfg["options.extras_require"].values())
    names = set()
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(re.split(r"[\s\[<>=!~;]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_every_third_party_import_is_a_declared_dependency():
    """A module the package imports (at the top or inside a function) comes from a distribution that
    setup.cfg names, so an installed wheel does not depend on what happens to be installed."""
    import importlib.metadata
    import sys

    if not (ROOT.parent / "setup.cfg").is_file():
        import pytest

        pytest.skip("an installed package without its setup.cfg")
    imported = set()
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != PACKAGE}
    providers = importlib.metadata.packages_distributions()
    declared = _declared_distributions()
    missing = {}
    for module in sorted(third_party):
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [module])}
        if not dists & declared:
            missing[module] = sorted(dists)
    assert not missing, f"imported but not declared in setup.cfg: {missing}"


MAX_MODULE_LINES = 420  # "modules under ~400 lines": split by concern before one grows past this


def test_modules_stay_small():
    sizes = {name: len(path.read_text().splitlines()) for name, path in module_files().items()}
    assert not {n: k for n, k in sizes.items() if k > MAX_MODULE_LINES}, "split these by concern"


def private_uses(path: Path) -> list[str]:
    """`file:line: name` for each `_private` name `path` reaches on another object or imports
    (`self._x` and dunders are fine)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        own = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
        if isinstance(node, ast.Attribute) and not own:
            names = [node.attr]
        elif isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names]
        found += [f"{path.name}:{node.lineno}: {n}" for n in names if n.startswith("_") and not n.startswith("__")]
    return found


def test_scripts_use_only_the_public_api(tmp_path):
    """`scripts/` are thin wrappers over the package (as in TRL): no private name of it, no private
    attribute of its objects (a benchmark timed the oracle through `oracle._engine`)."""
    import pytest

    scripts = ROOT.parent / "scripts"
    if not scripts.is_dir():
        pytest.skip("an installed package without the checkout's scripts/")
    probe = tmp_path / "probe.py"
    probe.write_text("from m import _y, z\noracle._load()\nself._x = obj.__dict__\n")
    assert private_uses(probe) == ["probe.py:1: _y", "probe.py:2: _load"]
    found = [use for path in sorted(scripts.glob("*.py")) for use in private_uses(path)]
    assert not found, "scripts reach private names (give the package a public way): " + "; ".join(found)
