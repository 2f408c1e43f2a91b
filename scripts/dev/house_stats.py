"""The package's shape in numbers: folders, modules, lines, the largest modules and functions, unannotated functions.

Reads the source with ast (nothing is imported or run; a second). Used to compare the tree before and after a
restructuring, e.g. `git archive <rev> quantkit | tar -x -C /tmp/old` and then
`python scripts/dev/house_stats.py /tmp/old/quantkit`.
"""
import argparse
import ast
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", nargs="?", default=str(Path(__file__).resolve().parents[2] / "quantkit"),
                        help="the package folder (default: this repository's quantkit/)")
    parser.add_argument("--top", type=int, default=6, help="how many of the largest modules and functions to list")
    args = parser.parse_args()
    root = Path(args.package)
    modules = sorted(root.rglob("*.py"))
    lines = {p: len(p.read_text().splitlines()) for p in modules}
    print(f"folders {len({p.parent for p in modules})}, modules {len(modules)}, lines {sum(lines.values())}")
    largest = sorted(lines.items(), key=lambda kv: -kv[1])[:args.top]
    print("largest modules:", ", ".join(f"{p.relative_to(root.parent)} {n}" for p, n in largest))
    functions, unannotated = [], 0
    for p in modules:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{p.relative_to(root.parent)}:{node.name}"))
                params = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                if (any(a.annotation is None and a.arg not in ("self", "cls") for a in params)
                        or (node.returns is None and node.name != "__init__")):
                    unannotated += 1
    functions.sort(reverse=True)
    print(f"functions {len(functions)}, not fully annotated {unannotated}")
    print("largest functions:", ", ".join(f"{name} {n}" for n, name in functions[:args.top]))


if __name__ == "__main__":
    main()
