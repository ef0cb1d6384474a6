"""Every Python example in the docs and in docstrings runs."""

import doctest
import importlib
import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
MODULES = [
    "datarax_ckpt._typing",
    "datarax_ckpt.options",
    "datarax_ckpt.serialization",
    "datarax_ckpt._handler",
    "datarax_ckpt._interop",
    "datarax_ckpt._incremental",
]


@pytest.mark.parametrize(
    "page", [p for p in DOCS if BLOCK.search(p.read_text())], ids=lambda p: p.name
)
def test_markdown_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_{page.stem}"}
    for i, block in enumerate(BLOCK.findall(page.read_text())):
        code = compile(block, f"{page.name}[python block {i}]", "exec")
        exec(code, namespace)  # noqa: S102 - running our own documentation


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_readme_has_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "python -m datarax_ckpt.demo" in readme
    assert 'pip install -e ".[dev]" && python -m pytest' in readme
    assert 'pip install -e ".[dev]" && python -m pytest' in (ROOT / ".ci" / "run").read_text()
    assert os.access(ROOT / ".ci" / "run", os.X_OK)
