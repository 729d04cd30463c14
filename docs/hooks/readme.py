"""MkDocs hook: the README's sections become the user guide's pages, and the files under
examples/ are published next to them, so README links resolve on the site as on GitHub.

The intro (before the first ``## `` heading) is ``index.md``; each ``## Title (`x`)``
section is a page named after the title (``the-gradcal-command.md``). Links into
``docs/`` lose that prefix; a link to a folder points at its README.md.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

__all__ = ["on_files", "page_name", "readme_pages"]

_LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


def page_name(title: str) -> str:
    """``"Losses (`gradcal.losses`)"`` -> ``"losses.md"``."""
    title = title.split("(")[0].replace("`", "").lower()
    return re.sub(r"[^a-z0-9]+", "-", title).strip("-") + ".md"


def _relink(text: str, root: Path) -> str:
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


def readme_pages(root: Path) -> dict[str, str]:
    """Page name -> markdown, one per ``## `` section of ``root/README.md``."""
    text = (root / "README.md").read_text(encoding="utf-8")
    pages: dict[str, str] = {}
    name, lines, fenced = "index.md", [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if line.startswith("## ") and not fenced:
            pages[name] = "\n".join(lines) + "\n"
            name, lines = page_name(line[3:]), ["# " + line[3:]]
        else:
            lines.append(line)
    pages[name] = "\n".join(lines) + "\n"
    return {k: _relink(v, root) for k, v in pages.items()}


def on_files(files: Files, config) -> Files:
    root = Path(config.config_file_path).parent
    for name, text in readme_pages(root).items():
        files.append(File.generated(config, name, content=text))
    for path in sorted((root / "examples").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            uri = path.relative_to(root).as_posix()
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
