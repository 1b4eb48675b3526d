"""Which manifest rows a run uses: every row for ``score``; one date's rows for ``nightly``."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.manifest import ManifestRow


@dataclass(frozen=True)
class RowSelection:
    """The queries a run scores, the reference candidates it may draw from, the calibration
    images it may use, and the earlier score rows it keeps.

    The default selects everything and keeps nothing (the ``score`` job). The nightly job
    narrows the queries to one capture date minus those already scored (``skip``: (dataset,
    image_id) pairs, since one image may be a query of several datasets), the
    references and calibration images to those captured on or before that date (or
    undated), and carries the kept
    rows of the date's earlier run from a Parquet file (``carried_scores``).
    """

    query_date: str | None = None
    skip: frozenset[tuple[str, str]] = frozenset()
    references_until: str | None = None
    carried_scores: str | None = None

    def is_query(self, row: ManifestRow) -> bool:
        """A query row this run scores."""
        if row.role != "query":
            return False
        if self.query_date is not None and row.capture_date != self.query_date:
            return False
        return (row.dataset, row.image_id) not in self.skip

    def is_calibration(self, row: ManifestRow) -> bool:
        """A ``calibration`` row this run may calibrate with: undated or captured on or
        before ``references_until``, as references."""
        if row.role != "calibration":
            return False
        return (self.references_until is None or row.capture_date is None
                or row.capture_date <= self.references_until)

    def is_candidate(self, row: ManifestRow) -> bool:
        """A row the reference draw may see (every non-reference row passes through)."""
        if row.role != "reference" or self.references_until is None:
            return True
        return row.capture_date is None or row.capture_date <= self.references_until


ALL_ROWS = RowSelection()
