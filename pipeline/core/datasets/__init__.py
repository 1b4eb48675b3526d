"""Readers of image datasets as they ship, one module per published layout, and plain
folders of unlabelled images; ``pipeline.core.make_manifest`` turns their rows into a
manifest.

A layout is a name, a phrase saying which files identify it, ``detect(tree)`` and
``read(tree, rows, options)``. ``LAYOUTS`` lists them in the order ``auto`` tries them, the
most specific first (MVTec LOCO AD and MVTec AD 2 trees would also pass for MVTec AD).
"""
from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Callable

from pipeline.core.datasets import mvtec, mvtec_ad2, mvtec_loco, realiad, visa
from pipeline.core.datasets.base import ReadOptions, Rows, Tree

AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    looks_like: str
    detect: Callable[[Tree], bool]
    read: Callable[[Tree, Rows, ReadOptions], None]


LAYOUTS: tuple[Layout, ...] = tuple(
    Layout(m.NAME, m.LOOKS_LIKE, m.detect, m.read)
    for m in (visa, realiad, mvtec_ad2, mvtec_loco, mvtec)
)
LAYOUT_NAMES: tuple[str, ...] = tuple(layout.name for layout in LAYOUTS)

#: How many of a root's entries an error message names.
_SHOWN = 12


def _layouts_text() -> str:
    return "; ".join(f"{layout.name}: {layout.looks_like}" for layout in LAYOUTS)


def _found_text(tree: Tree) -> str:
    dirs, files = tree.listdir(tree.root)
    names = sorted([posixpath.basename(d) + "/" for d in dirs]
                   + [posixpath.basename(f.path) for f in files])
    if not names:
        return "an empty folder"
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def layout_for(tree: Tree, name: str = AUTO) -> Layout:
    """The layout called ``name`` (checked against the tree's files), or with ``auto`` the
    first whose files the tree has.

    Raises:
        ValueError: an unknown name, a tree without the named layout's files, or (auto) no
            layout matches: the message says what the root holds and which layouts exist.
    """
    if name != AUTO:
        for layout in LAYOUTS:
            if layout.name == name:
                if not layout.detect(tree):
                    raise ValueError(f"dataset root {tree.url!r} is not in the {name} layout "
                                     f"({layout.looks_like}); it holds {_found_text(tree)}")
                return layout
        raise ValueError(f"unknown layout {name!r} (layouts: {AUTO}, {', '.join(LAYOUT_NAMES)})")
    for layout in LAYOUTS:
        if layout.detect(tree):
            return layout
    raise ValueError(
        f"dataset root {tree.url!r} matches no known layout; it holds {_found_text(tree)}. "
        f"Layouts: {_layouts_text()}. A folder of plain images takes --queries / "
        "--references instead of --root.")
