"""MkDocs hooks (mkdocs.yml): the README is the site's home page, and the links written
for GitHub work in the site too.

The Markdown links files as they lie in the repository: README.md -> docs/training.md,
docs/training.md -> ../README.md, docs/cluster.md -> ../conf/validate.py. That is what
GitHub follows. The site is built from docs/ alone, with the README as its index.md, so
every relative link is resolved against its page's place in the repository and written
again: to the page or file under docs/, to index.md for the README, and, for any other
file of the repository (source has no page in the site), to its plain text. A link to a
file that does not exist is left as it is, so the strict build fails on it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def on_files(files, config):
    files.append(File.generated(config, "index.md", content=(ROOT / "README.md").read_text()))
    return files


def on_page_markdown(markdown, page, config, files):
    src = page.file.src_uri
    here = "README.md" if src == "index.md" else f"docs/{src}"
    out, fence = [], None
    for line in markdown.split("\n"):
        m = FENCE.match(line)
        if m and (fence is None or m.group(1).startswith(fence)):
            fence = m.group(1) if fence is None else None
        out.append(line if fence or m else LINK.sub(lambda m: _rewrite(m, here, src), line))
    return "\n".join(out)


def _rewrite(m: re.Match, here: str, src: str) -> str:
    bang, text, target = m.groups()
    if SCHEME.match(target) or target.startswith(("#", "/")):
        return m.group(0)
    path, hash_, anchor = target.partition("#")
    in_repo = posixpath.normpath(posixpath.join(posixpath.dirname(here), path))
    if in_repo == "README.md":
        in_site = "index.md"
    elif in_repo.startswith("docs/"):
        in_site = in_repo.removeprefix("docs/")
    elif (ROOT / in_repo).exists() and not bang:
        return text
    else:
        return m.group(0)
    rel = posixpath.relpath(in_site, posixpath.dirname(src) or ".")
    return f"{bang}[{text}]({rel}{hash_}{anchor})"
