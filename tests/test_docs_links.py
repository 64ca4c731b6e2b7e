"""The docs site's link rewriting (tools/mkdocs_hooks.py): links written for GitHub, as
files in the repository, land on the same pages in the site. The strict build itself
(`make docs`, run by `make test`) fails on any link that lands nowhere."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "tools" / "mkdocs_hooks.py")
hooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hooks)


def rewrite(markdown: str, src_uri: str) -> str:
    page = SimpleNamespace(file=SimpleNamespace(src_uri=src_uri))
    return hooks.on_page_markdown(markdown, page, config=None, files=None)


def test_readme_links_to_docs_become_site_links():
    assert rewrite("[a](docs/cluster.md#placement)", "index.md") == "[a](cluster.md#placement)"
    assert (rewrite("![p](docs/laptop_compare/plots/accuracy.png)", "index.md")
            == "![p](laptop_compare/plots/accuracy.png)")


def test_docs_links_to_the_readme_and_between_pages():
    assert rewrite("[home](../README.md#two-commands)", "training.md") == "[home](index.md#two-commands)"
    assert rewrite("[t](training.md)", "cluster.md") == "[t](training.md)"
    assert rewrite("[r](../results.md)", "laptop_compare/report.md") == "[r](../results.md)"
    assert rewrite("[home](../../README.md)", "laptop_compare/report.md") == "[home](../index.md)"


def test_source_files_become_text_and_broken_links_stay_broken():
    assert rewrite("see [`conf/schema.py`](../conf/schema.py)", "training.md") == "see `conf/schema.py`"
    # Left as written, so the strict build names it.
    assert rewrite("[x](../conf/no_such_file.py)", "training.md") == "[x](../conf/no_such_file.py)"
    assert rewrite("[x](docs/no_such_page.md)", "index.md") == "[x](no_such_page.md)"


def test_urls_anchors_and_code_blocks_are_left_alone():
    text = "[u](https://example.org/a.md) [s](#section)\n```\n[c](docs/cluster.md)\n```"
    assert rewrite(text, "index.md") == text
