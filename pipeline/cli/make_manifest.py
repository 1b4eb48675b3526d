"""``python -m pipeline make-manifest``: a Parquet manifest from datasets as they ship
(``--root``) or from plain folders of images (``--queries`` / ``--references`` /
``--calibration``)."""
from __future__ import annotations

import argparse
import logging
import posixpath
from typing import Optional, Sequence

from pipeline.core.datasets import AUTO, LAYOUT_NAMES
from pipeline.core.make_manifest import (DatasetRoot, PlainFolders, ReadOptions, Source,
                                         build_manifest, summarize)
from pipeline.core.manifest import write_manifest

LOG = logging.getLogger(__name__)

#: Flags that describe one line of plain folders; a flag given twice starts the next line.
_FOLDER_FLAGS = ("queries", "references", "calibration")
_LINE_FLAGS = (*_FOLDER_FLAGS, "dataset", "category")


class _InOrder(argparse.Action):
    """Keeps (flag, value) in command-line order, so repeated groups can be told apart."""

    def __call__(self, parser, namespace, values, option_string=None):
        events = list(getattr(namespace, "events", None) or [])
        events.append((self.dest, values))
        namespace.events = events


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline make-manifest",
        description=(
            "Build a Parquet manifest from datasets as they ship (--root: MVTec AD and the "
            "layouts converted to it, VisA, MVTec LOCO AD, MVTec AD 2, Real-IAD) or from "
            "plain folders of unlabelled images (--queries / --references)."
        ),
    )
    parser.set_defaults(events=None)
    trees = parser.add_argument_group("datasets as they ship")
    trees.add_argument(
        "--root", action="append", default=None,
        help="dataset root folder or fsspec URL; repeat for several datasets",
    )
    trees.add_argument(
        "--layout", action="append", default=None, choices=(AUTO, *LAYOUT_NAMES),
        help="the roots' layout (default auto: recognised from the files); give one for "
             "every root or one per --root",
    )
    trees.add_argument("--realiad-jsons", default=None, metavar="NAME",
                       help="Real-IAD split set (default realiad_jsons; e.g. realiad_jsons_sv, "
                            "realiad_jsons_fuiad_0.4)")
    trees.add_argument("--realiad-images", default=None, metavar="NAME",
                       help="Real-IAD image folder (default: the first of realiad_1024, "
                            "realiad_512, realiad_256, realiad_raw that exists)")
    trees.add_argument("--mask-dir", default=None, metavar="DIR",
                       help="where the union of an image's several masks is written (MVTec "
                            "LOCO AD; default: <output without .parquet>_masks)")
    folders = parser.add_argument_group(
        "plain folders (one line each; a flag given again starts the next line)")
    folders.add_argument("--queries", action=_InOrder, metavar="DIR",
                         help="every image under DIR is a query with a null label")
    folders.add_argument("--references", action=_InOrder, metavar="DIR",
                         help="every image under DIR is a normal reference")
    folders.add_argument("--calibration", action=_InOrder, metavar="DIR",
                         help="every image under DIR is a normal calibration image (held out "
                              "from the references; read and kept, not scored yet)")
    folders.add_argument("--category", action=_InOrder, metavar="NAME",
                         help="category of the line's images (default: the dataset name)")
    folders.add_argument("--folder-per-line", action="store_true",
                         help="each folder given holds one subfolder per line, whose name is "
                              "the line's dataset (matched by name across the roles)")
    parser.add_argument(
        "--dataset", action=_InOrder, metavar="NAME",
        help="with --root: dataset name per root, in order (default: the root's basename); "
             "with plain folders: the line's dataset",
    )
    parser.add_argument(
        "--output", required=True, help="Parquet file to write (path or fsspec URL)"
    )
    return parser


def _root_sources(parser: argparse.ArgumentParser, args: argparse.Namespace,
                  events: list[tuple[str, str]]) -> list[Source]:
    roots: list[str] = args.root
    if any(flag == "category" for flag, _ in events) or args.folder_per_line:
        parser.error("--category and --folder-per-line go with plain folders; a dataset "
                     "root's categories are its own folders")
    names: list[Optional[str]] = [v for flag, v in events if flag == "dataset"]
    if names and len(names) != len(roots):
        parser.error(f"got {len(roots)} --root but {len(names)} --dataset; give one "
                     "--dataset per --root, or none")
    layouts = args.layout or [AUTO]
    if len(layouts) not in (1, len(roots)):
        parser.error(f"got {len(roots)} --root but {len(layouts)} --layout; give one "
                     "--layout for all, or one per --root")
    names = names or [None] * len(roots)
    layouts = layouts * len(roots) if len(layouts) == 1 else layouts
    return [DatasetRoot(root, name, layout) for root, name, layout in zip(roots, names, layouts)]


def _folder_sources(parser: argparse.ArgumentParser, args: argparse.Namespace,
                    events: list[tuple[str, str]]) -> list[Source]:
    if args.layout or args.realiad_jsons or args.realiad_images:
        parser.error("--layout, --realiad-jsons and --realiad-images go with --root")
    lines: list[dict[str, str]] = [{}]
    for flag, value in events:
        if flag in lines[-1]:
            lines.append({})
        lines[-1][flag] = value
    sources: list[Source] = []
    for line in lines:
        shown = " ".join(f"--{k} {v}" for k, v in line.items())
        try:
            sources.append(PlainFolders(
                dataset=line.get("dataset"),
                queries=tuple(v for k, v in line.items() if k == "queries"),
                references=tuple(v for k, v in line.items() if k == "references"),
                calibration=tuple(v for k, v in line.items() if k == "calibration"),
                category=line.get("category"), folder_per_line=args.folder_per_line))
        except ValueError as exc:
            parser.error(f"{shown}: {exc}")
    return sources


def _sources(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Source]:
    events: list[tuple[str, str]] = args.events or []
    has_folders = any(flag in _FOLDER_FLAGS for flag, _ in events)
    if args.root and has_folders:
        parser.error("give dataset roots (--root) or plain folders (--queries, --references, "
                     "--calibration), not both; build one manifest from each")
    if args.root:
        return _root_sources(parser, args, events)
    if not has_folders:
        parser.error("nothing to read: give --root DIR, or --queries / --references DIR")
    return _folder_sources(parser, args, [e for e in events if e[0] in _LINE_FLAGS])


def default_mask_dir(output: str) -> str:
    """``<output without .parquet>_masks``: beside the manifest, named after it."""
    base, ext = posixpath.splitext(output.rstrip("/"))
    return (base if ext.lower() in (".parquet", ".pq") else output.rstrip("/")) + "_masks"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sources = _sources(parser, args)
    options = ReadOptions(mask_dir=args.mask_dir or default_mask_dir(args.output),
                          realiad_jsons=args.realiad_jsons, realiad_images=args.realiad_images)
    try:
        built = build_manifest(sources, options)
        for root, layout in built.layouts:
            LOG.info("%s: read as %s", root, layout)
        write_manifest(built.frame, args.output)
    except (ValueError, OSError) as exc:
        LOG.error("make-manifest failed: %s", exc)
        return 1
    LOG.info("wrote %d rows to %s (%s); %s", len(built.frame), args.output,
             summarize(built.frame), built.problems.summary())
    return 0
