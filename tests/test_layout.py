"""The package's shape is part of its contract with the people who work on it (docs/ARCHITECTURE.md): folders are the
stages of the flow, imports run one way, private names stay inside their module, and no module or function grows
past the size a reader can hold without saying why."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "quantkit"
SCRIPTS = PACKAGE.parent / "scripts"

# Lower layers never import higher ones; folders on one layer never import each other. The top-level modules
# (errors, config, untrusted, faults) are the shared vocabulary every stage may use.
LAYERS = [
    {"errors", "config", "untrusted", "faults"},
    {"source", "solve", "memory"},
    {"calibrate", "write"},
    {"run", "formats"},
    {"verification"},
    {"tools"},
    {"cli"},
]
RANK = {part: i for i, layer in enumerate(LAYERS) for part in layer}
FACADES = {"__init__", "__main__"}  # quantkit/__init__.py is the public API: it may reach every stage, lazily

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
LONG_REASON = "Kept whole:"  # how a docstring says why a function is longer than MAX_FUNCTION_LINES


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def dotted(path: Path) -> str:
    return ".".join(("quantkit", *path.relative_to(PACKAGE).with_suffix("").parts))


def stage(name: str) -> str | None:
    """The stage of a dotted quantkit module (its folder, or the top-level module's name)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "quantkit" else None


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) for every `import` and `from ... import` in the file, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names]
    return found


def test_the_package_has_no_relative_imports_and_every_folder_is_a_known_stage():
    assert {p.parent.name for p in modules() if p.parent != PACKAGE} <= set(RANK)
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path}:{node.lineno}: relative import"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way(path):
    if path.stem in FACADES and path.parent == PACKAGE:
        return
    own = stage(dotted(path))
    for line, module, _ in imports(path):
        other = stage(module)
        if other is None or other == own or other in FACADES:
            continue
        assert other in RANK, f"{path}:{line}: imports {module}, which is in no stage"
        assert RANK[other] < RANK[own] or (RANK[other] == RANK[own] == 0), (
            f"{path}:{line}: {own} imports {module} ({other}), which is not below it")


@pytest.mark.parametrize("path", [*modules(), *sorted(SCRIPTS.rglob("*.py"))],
                         ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_no_private_name_is_imported_from_another_module(path):
    for line, module, names in imports(path):
        if module.startswith("quantkit"):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, f"{path}:{line}: imports private {private} from {module}"


def test_the_architecture_document_names_every_stage_and_module():
    """docs/ARCHITECTURE.md is a newcomer's map: a module missing from it is a module nobody was told about."""
    text = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text()
    folders = {p.parent.name for p in modules() if p.parent != PACKAGE}
    missing = [f"{folder}/" for folder in sorted(folders) if f"`{folder}/`" not in text]
    missing += [str(p.relative_to(PACKAGE)) for p in modules()
                if p.stem != "__init__" and p.parent != PACKAGE and f"`{p.name}`" not in text]
    assert not missing, f"docs/ARCHITECTURE.md does not describe {missing}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_stay_readable(path):
    text = path.read_text()
    lines = len(text.splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path} has {lines} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                assert LONG_REASON in (ast.get_docstring(node) or ""), (
                    f"{path}:{node.lineno}: {node.name} has {length} lines and no '{LONG_REASON}' reason")
