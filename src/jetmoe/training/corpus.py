"""The embedded default corpus: documentation every Python installation carries. Nothing is downloaded.

Two sources, read in a fixed order so the corpus (and so a run on it) is reproducible for a given Python:
  - `pydoc_data.topics`: the language reference topics that `help()` shows (one document per topic);
  - docstrings of the pure-Python standard library modules, read with `ast` from the source files (importing
    every module would have side effects: `antigravity` opens a browser, `this` prints). One document per
    module: its docstring, then each public class / function signature with its docstring.
"""

from __future__ import annotations

import ast
import os
import sys
import sysconfig
from collections.abc import Iterator

# Bump when the extraction changes, so token caches keyed on it are rebuilt.
CORPUS_VERSION = 1

_SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "turtledemo", "lib2to3"}


def corpus_fingerprint() -> str:
    """Identifies the corpus content: it depends on the Python version that carries it."""
    return f"python-stdlib-docs-v{CORPUS_VERSION}-{sys.version.split()[0]}"


def pydoc_topics() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield text


def _stdlib_sources() -> Iterator[tuple[str, str]]:
    """(dotted module name, file path) of the standard library's .py files, sorted."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED_DIRS and not d.startswith("."))
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            parts = os.path.relpath(path, root)[: -len(".py")].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts and not any(p.startswith("_") or "-" in p for p in parts):
                found.append((".".join(parts), path))
    return iter(sorted(found))


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    args = ast.unparse(node.args)
    return f"({args})"


def module_document(module: str, source: str) -> str | None:
    """The module's docstring and its public classes' and functions' signatures and docstrings."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"{module}\n\n{doc.strip()}")

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            qualified = f"{prefix}{node.name}"
            if isinstance(node, ast.ClassDef):
                if doc:
                    parts.append(f"class {qualified}\n{doc.strip()}")
                visit(node.body, qualified + ".")
            elif doc:
                parts.append(f"{qualified}{_signature(node)}\n{doc.strip()}")

    visit(tree.body, module + ".")
    return "\n\n".join(parts) if parts else None


def module_docstrings() -> Iterator[str]:
    for module, path in _stdlib_sources():
        try:
            with open(path, encoding="utf-8") as handle:
                source = handle.read()
        except (OSError, UnicodeDecodeError):
            continue
        document = module_document(module, source)
        if document:
            yield document


def stdlib_documents() -> Iterator[str]:
    """Every document of the embedded corpus, in a fixed order."""
    yield from pydoc_topics()
    yield from module_docstrings()
