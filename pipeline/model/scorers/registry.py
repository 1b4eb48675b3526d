"""The scorers and extractors a run can name, by name: one line each.

A new scorer is one module with its ``ScorerEntry`` (and, if it reads new features, an
``ExtractorEntry``), one line here and its tests; ``register`` adds one from elsewhere (a
plugin, a test). The order is the order tables show scorers in.
"""
from __future__ import annotations

from pipeline.model.scorers.anomalydino import ANOMALYDINO_ENTRY
from pipeline.model.scorers.base import ExtractorEntry, Option, ScorerEntry
from pipeline.model.scorers.clip import CLIP_ENTRY
from pipeline.model.scorers.cnn import CNN_ENTRY
from pipeline.model.scorers.coop import COOP_ENTRY
from pipeline.model.scorers.dino import DINO_ENTRY
from pipeline.model.scorers.inctrl import INCTRL, INCTRL_ENTRY
from pipeline.model.scorers.padim import PADIM_ENTRY
from pipeline.model.scorers.patchcore import PATCHCORE_ENTRY
from pipeline.model.scorers.regad import REGAD_ENTRY, REGAD_EXTRACTOR_ENTRY
from pipeline.model.scorers.spade import SPADE_ENTRY
from pipeline.model.scorers.winclip import WINCLIP_ENTRY, WINDOWS_ENTRY

BUILTIN_EXTRACTORS: tuple[ExtractorEntry, ...] = (
    CLIP_ENTRY, WINDOWS_ENTRY, CNN_ENTRY, DINO_ENTRY, REGAD_EXTRACTOR_ENTRY)
BUILTIN_SCORERS: tuple[ScorerEntry, ...] = (
    INCTRL_ENTRY, SPADE_ENTRY, PADIM_ENTRY, PATCHCORE_ENTRY, WINCLIP_ENTRY, ANOMALYDINO_ENTRY,
    REGAD_ENTRY, COOP_ENTRY)
DEFAULT_SCORERS: tuple[str, ...] = (INCTRL,)

_EXTRACTORS: dict[str, ExtractorEntry] = {e.name: e for e in BUILTIN_EXTRACTORS}
_SCORERS: dict[str, ScorerEntry] = {e.name: e for e in BUILTIN_SCORERS}


def register(entry: ScorerEntry | ExtractorEntry) -> None:
    """Add a scorer or an extractor (its name must be new; a scorer's extractor must be
    registered first; its options' names must not clash with others')."""
    table = _SCORERS if isinstance(entry, ScorerEntry) else _EXTRACTORS
    if not entry.name or entry.name in table:
        raise ValueError(f"{type(entry).__name__} needs a new name, got {entry.name!r}")
    if isinstance(entry, ScorerEntry) and entry.extractor not in _EXTRACTORS:
        raise ValueError(f"scorer {entry.name!r} reads extractor {entry.extractor!r}, which "
                         f"is not registered ({', '.join(_EXTRACTORS)})")
    taken = {o.name for o in options()}
    clash = [o.name for o in entry.options if o.name in taken]
    if clash:
        raise ValueError(f"{entry.name!r}: option(s) {clash} are already defined")
    table[entry.name] = entry


def unregister(name: str) -> None:
    """Remove a scorer added with ``register`` (tests)."""
    if any(e.name == name for e in BUILTIN_SCORERS):
        raise ValueError(f"{name!r} is built in")
    _SCORERS.pop(name, None)


def scorer_names() -> tuple[str, ...]:
    """Every scorer, in the order tables show them."""
    return tuple(_SCORERS)


def extractor_names() -> tuple[str, ...]:
    return tuple(_EXTRACTORS)


def scorer_entry(name: str) -> ScorerEntry:
    try:
        return _SCORERS[name]
    except KeyError:
        raise ValueError(f"unknown scorer {name!r}; choose from {', '.join(_SCORERS)}") from None


def extractor_entry(name: str) -> ExtractorEntry:
    try:
        return _EXTRACTORS[name]
    except KeyError:
        raise ValueError(f"unknown extractor {name!r}; registered: "
                         f"{', '.join(_EXTRACTORS)}") from None


def options() -> tuple[Option, ...]:
    """Every extractor's and scorer's settings, each once, extractors first."""
    return tuple(o for e in (*_EXTRACTORS.values(), *_SCORERS.values()) for o in e.options)


def option(name: str) -> Option:
    for o in options():
        if o.name == name:
            return o
    raise KeyError(f"no scorer or extractor setting {name!r}")


def components() -> tuple[str, ...]:
    """Every scorer's output components (``<name>_score`` columns), each once."""
    return tuple(dict.fromkeys(c for e in _SCORERS.values() for c in e.components))
