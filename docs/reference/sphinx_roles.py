"""A griffe extension that renders the Sphinx roles of AsyncFlow's docstrings.

The docstrings cross-reference with reStructuredText roles
(``:class:`TaskFuture```, ``:meth:`~asyncflow.WorkflowEngine.shutdown```),
which Markdown would show verbatim. This extension turns each role into an
optional cross-reference: a link when the API reference documents the target,
inline code otherwise (an unresolved optional reference is not a warning).
"""

from __future__ import annotations

import html
import re
from typing import Any

from griffe import Extension, Module, Object

_ROLE = re.compile(
    r":(?:py:)?(?:class|meth|func|mod|data|attr|exc|obj|const):"
    r"`(?P<body>[^`]+)`"
)
_TITLED = re.compile(r"(?P<title>.+?)\s*<(?P<target>[^>]+)>$")


class SphinxRoles(Extension):
    """Rewrite ``:role:`target``` in every docstring of the loaded package."""

    def on_package(self, *, pkg: Module, **kwargs: Any) -> None:
        self._rewrite(pkg, seen=set())

    def _rewrite(self, obj: Object, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(
                lambda match: _reference(obj, match["body"]), obj.docstring.value
            )
        for member in obj.members.values():
            if not member.is_alias and isinstance(member, Object):
                self._rewrite(member, seen)


def _reference(obj: Object, body: str) -> str:
    titled = _TITLED.match(body)
    if titled:
        title, target = titled["title"], titled["target"]
    else:
        target = body.lstrip("~")
        title = target.rsplit(".", 1)[-1] if body.startswith("~") else target
    identifier = _resolve(obj, target)
    return (
        f'<autoref identifier="{html.escape(identifier)}" optional>'
        f"<code>{html.escape(title)}</code></autoref>"
    )


def _resolve(obj: Object, target: str) -> str:
    """The full path of ``target`` as the code around ``obj`` sees it."""
    head, dot, rest = target.partition(".")
    try:
        resolved = obj.resolve(head)
    except Exception:
        return target
    return f"{resolved}{dot}{rest}"
