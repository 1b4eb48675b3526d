"""The run report: one date's committed outputs as a self-contained HTML folder.

``build_report(OUT, date)`` writes ``OUT/report/run_date=<date>/index.html`` and the image
thumbnails it shows, and returns the page's URL. The page has the run's identity (date, run
ids, models, scorers, k, seeds), per dataset the metrics per scorer, ROC and precision-recall
curves, score histograms by label and a gallery of the most anomalous queries beside their
references, the errors by stage and, for nightly outputs, the drift against the previous night
and the score quantiles and anomaly rate of the last nights.

Modules: ``inputs`` (reading the committed files), ``curves`` (the numbers behind the plots),
``svg`` (the plots), ``thumbnails`` (image copies), ``sections`` (the page's parts),
``page`` (the document), ``build`` (the whole). Numbers read as :func:`format_metric` writes
them.
"""
from pipeline.report.build import INDEX, REPORT_DIR, build_report, report_dir
from pipeline.report.formatting import format_metric

__all__ = ["INDEX", "REPORT_DIR", "build_report", "format_metric", "report_dir"]
