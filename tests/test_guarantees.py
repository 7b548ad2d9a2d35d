"""The README's "What is guaranteed" section: every promise cites tests, and every cited test exists."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _promises() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## What is guaranteed", 1)[1].split("\n## ", 1)[0]
    return ["- " + item for item in section.split("\n- ")[1:]]


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_promise_cites_existing_tests() -> None:
    promises = _promises()
    assert len(promises) >= 6
    for promise in promises:
        title = promise.split("**")[1]
        cited = re.findall(r"`(test_\w+\.py)::(test_\w+)`", promise)
        assert cited, f"the promise {title!r} cites no test"
        for file, name in cited:
            path = ROOT / "tests" / file
            assert path.is_file(), f"{title!r} cites {file}, which does not exist"
            assert name in _test_names(path), f"{title!r} cites {file}::{name}, which does not exist"
