"""The report's HTML document: one page, its style inline, no script and no external request
(the page must render the same from a file share, offline, years later)."""
from __future__ import annotations

import html
from typing import Sequence

STYLE = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       margin: 0 auto; max-width: 1220px; padding: 16px 24px 48px; color: #1f2328;
       background: #ffffff; line-height: 1.4; }
h1 { font-size: 1.6em; margin: 0.2em 0 0.4em; }
h2 { border-bottom: 2px solid #d0d7de; padding-bottom: 4px; margin-top: 1.8em; }
h2.small { font-size: 1.1em; border: none; margin-top: 0.8em; }
h3 { margin: 1.3em 0 0.4em; color: #24476b; }
section.dataset { border-top: 4px solid #24476b; margin-top: 2.2em; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; margin: 0; }
dl.facts dt { font-weight: 600; } dl.facts dd { margin: 0; }
table { border-collapse: collapse; margin: 6px 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f3f6; }
td.metric, td.quantile, td.count { font-variant-numeric: tabular-nums; white-space: nowrap; }
td.model-id { font-family: monospace; font-size: 0.9em; word-break: break-all; }
td.reason { font-family: monospace; font-size: 0.88em; max-width: 640px; }
td.status.drift { background: #ffd8d3; font-weight: 600; }
td.status.new, td.status.gone { background: #fff3c4; }
p.note { color: #57606a; font-size: 0.9em; margin: 4px 0; }
p.warning { color: #8a2b06; background: #fff1e5; padding: 6px 10px; border-radius: 4px; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
svg.chart { border: 1px solid #eaeef2; background: #ffffff; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr));
           gap: 10px; }
.query-row { display: flex; gap: 12px; align-items: flex-start; padding: 8px;
             border: 1px solid #eaeef2; border-radius: 4px; }
figure { margin: 0; }
figure.query figcaption { font-size: 0.85em; max-width: 170px; }
figure.reference figcaption { font-size: 0.72em; color: #57606a; max-width: 80px;
                              overflow-wrap: anywhere; }
.references { display: flex; flex-wrap: wrap; gap: 6px; align-items: flex-start; }
img.query { width: 160px; height: auto; image-rendering: pixelated; border: 1px solid #888; }
img.reference { width: 80px; height: auto; image-rendering: pixelated; border: 1px solid #bbb; }
div.missing { width: 80px; min-height: 60px; font-size: 0.75em; color: #8a2b06;
              border: 1px dashed #d0a090; padding: 4px; }
span.id { color: #57606a; font-family: monospace; font-size: 0.9em; }
nav ul { columns: 3; }
details { margin: 6px 0; } summary { cursor: pointer; color: #24476b; }
"""


def document(title: str, body: Sequence[str]) -> str:
    """The page: ``body`` fragments (already escaped HTML) in a complete document."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")
