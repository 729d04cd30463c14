"""MkDocs hook: the README is the site's home page, and the files under examples/ are
published next to the pages, so links into examples/ resolve on the site as on GitHub.

The user guide pages are ordinary files in docs/. The README links into ``docs/`` and
``examples/`` from the repository's root, the pages in docs/ into ``../examples/``; both
are rewritten to the site's layout, where docs/ is the root and examples/ sits inside it.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

__all__ = ["home_page", "on_files", "on_page_markdown"]

_LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


def _relink(text: str, root: Path) -> str:
    """README links (relative to the repository's root) -> links relative to docs/."""

    def fix(match: re.Match[str]) -> str:
        target, anchor = match.group(1), match.group(2) or ""
        if target.startswith(("http://", "https://", "mailto:")):
            return match.group(0)
        if target.startswith("docs/"):
            target = target.removeprefix("docs/")
        elif (root / target).is_dir() and (root / target / "README.md").is_file():
            target = target.rstrip("/") + "/README.md"
        return f"]({target}{anchor})"

    return _LINK.sub(fix, text)


def home_page(root: Path) -> str:
    """The site's ``index.md``: ``root/README.md`` with its links made relative to docs/."""
    return _relink((root / "README.md").read_text(encoding="utf-8"), root)


def on_files(files: Files, config) -> Files:
    root = Path(config.config_file_path).parent
    files.append(File.generated(config, "index.md", content=home_page(root)))
    for path in sorted((root / "examples").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            uri = path.relative_to(root).as_posix()
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    """``../examples/x`` in a page at docs/'s top level -> ``examples/x`` on the site."""
    if "/" in page.file.src_uri:
        return markdown
    return markdown.replace("](../examples/", "](examples/")
