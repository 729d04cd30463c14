"""Griffe extension for the API reference: reads gradcal's docstring conventions.

- An ``Example:`` section is read as Google style's ``Examples:``, so doctests render as
  code rather than as markdown text.
- ``a, b: description`` in an ``Arguments:`` section documents each of a and b.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

__all__ = ["DocstringConventions"]

_SECTION = re.compile(r"^(\s*)(Arguments|Args|Parameters|Attributes):\s*$")
_GROUPED = re.compile(r"^(\s+)(\w+(?:,\s*\w+)+):\s*(.*)$")


def _rewrite(text: str) -> str:
    out, in_arguments = [], False
    for line in text.splitlines():
        if re.fullmatch(r"\s*Example:\s*", line):
            line = line.replace("Example:", "Examples:")
        if re.fullmatch(r"\s*[A-Z][\w ]*:\s*", line):  # a section's title
            in_arguments = bool(_SECTION.match(line))
        grouped = _GROUPED.match(line) if in_arguments else None
        if grouped:
            indent, names, description = grouped.groups()
            out += [f"{indent}{name}: {description}" for name in re.split(r",\s*", names)]
        else:
            out.append(line)
    return "\n".join(out)


class DocstringConventions(griffe.Extension):
    """Rewrite each docstring once, before it is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _rewrite(obj.docstring.value)
