#!/usr/bin/env python3
"""Build quantkit's built-in calibration / evaluation text sets.

Source: docstrings of the CPython 3.11 standard library found on the local
machine (no network access needed).  Licence of the source text: Python
Software Foundation License Version 2 (PSF-2.0).

Procedure (fully deterministic for a given stdlib tree):

1. Walk every ``*.py`` file below the interpreter's stdlib directory in sorted
   (POSIX relative path) order, skipping ``site-packages``/``dist-packages``,
   ``__pycache__`` and test directories (``test``, ``tests``, ``idle_test``).
2. Parse each file with :mod:`ast` and collect the module, class and function
   docstrings (``ast.get_docstring(node, clean=True)``) in ``ast.walk`` order.
3. Normalise each docstring (NFC, ``\\n`` line endings, trailing whitespace
   stripped, valid UTF-8) and keep it if it is at least ``MIN_CHARS`` long.
4. Drop exact duplicates (the first occurrence in walk order wins).
5. Assign every *source file* to a set by the first byte of
   ``sha256(relative_path)``: ``byte % 4 != 3`` -> calibration,
   ``byte % 4 == 3`` -> evaluation.  A module therefore contributes to exactly
   one set, and the two sets are disjoint.

Outputs (JSON Lines, one ``{"text": ..., "source": ...}`` object per line):

    calibration/pydocs-calib.jsonl
    calibration/pydocs-eval.jsonl

Usage: ``python3 scripts/dev/build_calibration_sets.py [--out-dir DIR]`` (takes a few seconds)
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import sys
import sysconfig
import unicodedata
from pathlib import Path

MIN_CHARS = 200
EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)
DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def iter_source_files(root: Path):
    """Yield (relative posix path, absolute path) of stdlib .py files, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return found


def normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text)
    text = "\n".join(line.rstrip() for line in text.split("\n")).strip()
    # Guarantee valid UTF-8 (lone surrogates etc. become U+FFFD).
    return text.encode("utf-8", "replace").decode("utf-8")


def docstrings(source: bytes, filename: str):
    try:
        tree = ast.parse(source, filename=filename)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, DOC_NODES):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def split_of(rel_path: str) -> str:
    first_byte = hashlib.sha256(rel_path.encode("utf-8")).digest()[0]
    return "eval" if first_byte % 4 == 3 else "calib"


def build(root: Path):
    seen: set[str] = set()
    sets: dict[str, list[dict[str, str]]] = {"calib": [], "eval": []}
    for rel, path in iter_source_files(root):
        target = sets[split_of(rel)]
        for doc in docstrings(path.read_bytes(), rel):
            text = normalise(doc)
            if len(text) < MIN_CHARS or text in seen:
                continue
            seen.add(text)
            target.append({"text": text, "source": rel})
    return sets


def write_jsonl(path: Path, records) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main(argv=None) -> int:
    repo = Path(__file__).resolve().parents[2]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=repo / "calibration")
    parser.add_argument("--stdlib", type=Path, default=stdlib_dir())
    args = parser.parse_args(argv)

    sets = build(args.stdlib.resolve())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, records in sets.items():
        out = args.out_dir / f"pydocs-{name}.jsonl"
        write_jsonl(out, records)
        text_bytes = len("\n\n".join(r["text"] for r in records).encode("utf-8"))
        n_src = len({r["source"] for r in records})
        sha = hashlib.sha256(out.read_bytes()).hexdigest()
        print(
            f"{out}: {len(records)} docs from {n_src} files, "
            f"{text_bytes} text bytes, {out.stat().st_size} file bytes, sha256 {sha}"
        )
    print(f"python {sys.version.split()[0]}, stdlib {args.stdlib}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
