"""``python -m pipeline.nightly ...`` = ``python -m pipeline nightly ...`` (for Airflow's Beam
operator, which runs a module with ``--key=value`` options only)."""
import sys

from pipeline.cli import main

sys.exit(main(["nightly", *sys.argv[1:]]))
