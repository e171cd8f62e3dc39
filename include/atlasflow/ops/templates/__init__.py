"""The jinja2 templates of atlasflow's HTML pages and the one stylesheet they share.

The run report (:mod:`atlasflow.ops.report`) and the storage view
(:mod:`atlasflow.ops.storage_view`) extend ``base.html.j2``, which inlines ``atlasflow.css``:
the report is one self-contained file, mailed and archived without its assets. The files ship
as package data (``pyproject.toml``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["environment"]


def environment(**filters: Callable[..., Any]) -> Any:
    """A jinja2 environment over this folder, with autoescape on.

    Parameters
    ----------
    **filters
        Formatting filters the caller's templates use (``{{ value | name }}``).

    Returns
    -------
    jinja2.Environment
        Undefined names raise instead of rendering as empty text; the stylesheet is the
        global ``stylesheet``.
    """
    # imported here, not at module level: the CLI imports the report module for every command,
    # also on cluster nodes whose environment may lack jinja2
    import jinja2
    from markupsafe import Markup

    env = jinja2.Environment(loader=jinja2.PackageLoader("atlasflow.ops", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(filters)
    # our own file, not input: inlined as it is (escaping would turn its quotes into entities)
    env.globals["stylesheet"] = Markup(env.loader.get_source(env, "atlasflow.css")[0])
    return env
