"""The product's files import one another without a circle (issue 20: evaluate.py and judge.py used to import
each other, inside functions). The graph is read from the source with `ast`, so imports inside functions count,
as they do when the function runs."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def project_imports(root: Path) -> dict[str, set[str]]:
    """{module: the project's modules it imports anywhere in its file}, for every *.py directly in root."""
    modules = {path.stem: path for path in root.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
        graph[name] = (imported & set(modules)) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None: a depth-first search that meets a module still on its path."""
    done, path = set(), []

    def visit(module):
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            if cycle := visit(imported):
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        if cycle := visit(module):
            return cycle
    return None


def test_cycle_finder_on_graphs_read_by_eye():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None  # a diamond is no circle
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"x": {"a"}, "a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_imports_inside_functions_count(tmp_path):
    """The shape of the old circle: each file imports the other only inside a function."""
    (tmp_path / "evaluate.py").write_text("def judge_hs():\n    from judge import rules_harmful\n")
    (tmp_path / "judge.py").write_text("import json\n\n\ndef draw():\n    from evaluate import in_split\n")
    (tmp_path / "data.py").write_text("import torch.nn as nn\n")  # not the project's: left out
    graph = project_imports(tmp_path)
    assert graph == {"evaluate": {"judge"}, "judge": {"evaluate"}, "data": set()}
    assert find_cycle(graph) == ["evaluate", "judge", "evaluate"]


def test_no_import_circle_among_the_products_files():
    graph = project_imports(ROOT)
    assert {"evaluate", "judge", "judge_study", "report", "data", "model"} <= set(graph)  # the real files were read
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_the_judges_are_imported_never_importing_their_users():
    """judge.py is used by evaluate.py, report.py and judge_study.py, and imports none of them."""
    graph = project_imports(ROOT)
    assert "judge" in graph["evaluate"] and "judge" in graph["report"] and "judge" in graph["judge_study"]
    assert not graph["judge"] & {"evaluate", "report", "judge_study"}
    assert not graph["report"] & {"evaluate", "judge_study"} and not graph["judge_study"] & {"evaluate", "report"}
