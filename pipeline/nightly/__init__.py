"""The nightly inspection job: one capture date's queries, scored incrementally and
idempotently, with a drift report (``job``; the plan and drift logic beside it)."""
