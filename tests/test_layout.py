"""The layout: imports run one way, notebooks -> util -> rlhf/ (the plumbing); seeds.py, bench/
and .dev/ on top. The imports are read from the source (ast), as farm-studio reads them."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ON_TOP = {"util", "seeds"}                  # the root's modules; the plumbing is the package rlhf


def _is_type_checking(test) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_main_guard(test) -> bool:
    """`if __name__ == "__main__":` runs only when the file is a script, where it is the module
    __main__: what it imports imports this file anew, so that is no circle."""
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__" and any(isinstance(c, ast.Constant) and c.value ==
                                                   "__main__" for c in test.comparators))


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path: Path, root: Path) -> tuple[set, set]:
    """(modules imported when the code runs, modules imported for type hints only) by one file;
    function-local imports run, so they count."""
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    run, hints = set(), set()

    def visit(node, into):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_main_guard(child.test):
                continue
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.body:
                    visit(ast.Module(body=[sub], type_ignores=[]), hints)
                for sub in child.orelse:
                    visit(ast.Module(body=[sub], type_ignores=[]), into)
                continue
            if isinstance(child, ast.Import):
                into.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join([p for p in up if p] + ([base] if base else []))
                into.add(base)
                into.update(f"{base}.{a.name}" for a in child.names)   # from rlhf import runtime
            visit(child, into)
    visit(ast.parse(path.read_text(), str(path)), run)
    return run, hints


def project_graph(root: Path, files: list[Path]) -> tuple[dict, dict]:
    """{module: project modules it imports at run time}, and the same for type hints."""
    names = {module_name(f, root): f for f in files}

    def ours(targets):
        return {t for t in targets if t in names and t}
    graph, hints = {}, {}
    for name, f in names.items():
        run, hint = imports(f, root)
        graph[name], hints[name] = ours(run) - {name}, ours(hint) - {name}
    # a package's face (rlhf/__init__.py) is imported with each of its modules: no edge of its own
    for g in (graph, hints):
        for name in g:
            g[name] = {t for t in g[name] if not (names[t].name == "__init__.py"
                                                   and any(u.startswith(t + ".") for u in g[name]))}
    return graph, hints


def find_cycle(graph: dict) -> list[str] | None:
    """One import circle (a -> b -> ... -> a) if there is any (depth-first search), else None."""
    state, stack = {}, []

    def dfs(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None
    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


def project_files(root: Path) -> list[Path]:
    return [*root.glob("*.py"), *root.glob("rlhf/*.py"), *root.glob("bench/*.py"),
            *root.glob(".dev/*.py")]


def test_the_imports_of_the_project_form_no_circle():
    graph, _ = project_graph(ROOT, project_files(ROOT))
    assert "util" in graph and graph["util"], graph     # the parser saw util's imports
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_imports_run_one_way_util_on_top_of_the_package():
    graph, hints = project_graph(ROOT, project_files(ROOT))
    assert {p.stem for p in ROOT.glob("*.py")} == ON_TOP, "a module at the root: put it in rlhf/"
    assert graph["util"] >= {"rlhf.config", "rlhf.sql_data", "rlhf.runtime"}
    assert "util" in graph["bench.bench"]                 # the benchmark sits on top of util
    for name in graph:
        if name.startswith("rlhf"):
            above = (graph[name] | hints[name]) & ON_TOP
            assert not above, f"{name} imports {above}: the package may not import what is above"
            assert all(t.startswith("rlhf") for t in graph[name] | hints[name]), name


def _tree(tmp_path, files: dict) -> Path:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


@pytest.mark.parametrize("where, expect", [
    # function-local, relative and `from package import module` imports all count
    ("def f():\n    import util\n", ["rlhf.saving", "util", "rlhf.saving"]),
    ("from util import Config\n", ["rlhf.saving", "util", "rlhf.saving"]),
    ("from .. import util\n", None),            # beyond the package: nothing of ours
    ("if TYPE_CHECKING:\n    from util import Config\n", None),     # type hints only: never runs
    ("if __name__ == '__main__':\n    import util\n", None),        # a script's own run
])
def test_a_circle_is_found_wherever_its_import_stands(tmp_path, where, expect):
    root = _tree(tmp_path, {"util.py": "from rlhf.saving import save\n",
                            "rlhf/__init__.py": "", "rlhf/saving.py": where})
    graph, _ = project_graph(root, project_files(root))
    assert find_cycle(graph) == expect


def test_a_longer_circle_through_the_package_is_found(tmp_path):
    root = _tree(tmp_path, {"util.py": "from rlhf import config\n", "rlhf/__init__.py": "",
                            "rlhf/config.py": "from .runtime import ROOT\n",
                            "rlhf/runtime.py": "def f():\n    from rlhf.config import Config\n"})
    graph, _ = project_graph(root, project_files(root))
    assert find_cycle(graph) == ["rlhf.config", "rlhf.runtime", "rlhf.config"]
