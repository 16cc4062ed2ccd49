"""Griffe extension for the API pages: the docstrings' reStructuredText markup in Markdown.

The docstrings are numpydoc, written for ``help()`` and Sphinx-style tools: inline
``:math:`x```, ``.. math::`` blocks, ``:func:`name``` roles and ``::`` literal blocks.
mkdocstrings renders Markdown, so this rewrites them as MathJax (``$x$``, ``$$ ... $$``)
and code spans before the docstrings are parsed.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_INLINE_MATH = re.compile(r":math:`([^`]+)`")
_ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|obj):`~?([^`]+)`")
# ".. math:: first line" and the lines indented under it.
_BLOCK_MATH = re.compile(r"^( *)\.\. math::[ \t]*(.*)\n((?:\1[ \t]+\S.*\n|[ \t]*\n)*)", re.M)
_LITERAL = re.compile(r"(\S)::\n\n")


def _block(match: re.Match[str]) -> str:
    indent, first, rest = match.groups()
    body = " ".join([first.strip()] + [line.strip() for line in rest.splitlines()]).strip()
    return f"{indent}$$\n{indent}{body}\n{indent}$$\n\n"


def markdown(text: str) -> str:
    """``text`` with its reStructuredText math, roles and literal-block markers rewritten."""
    text = _BLOCK_MATH.sub(_block, text)
    text = _INLINE_MATH.sub(lambda m: f"${m[1]}$", text)
    text = _ROLE.sub(lambda m: f"`{m[1]}`", text)
    return _LITERAL.sub(r"\1:\n\n", text)


class RstRoles(griffe.Extension):
    """Rewrite every docstring with :func:`markdown` as it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
