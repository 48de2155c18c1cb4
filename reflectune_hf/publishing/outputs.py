"""The files of an output folder that `save_local` wrote, recorded in the folder's manifest.

A folder is written again by later runs (the same `--output_dir`), and a run does not always
write what the run before it wrote: no `quality.json` without `--quality_report`, no `selected`
split with `--selection none`, a single `Dataset` instead of splits. Left behind, such files
describe another run's data: `reflectune push` would publish an earlier run's quality statistics
with this run's data, and a stale `arrow/dataset_dict.json` would even reload the earlier splits.

The design, chosen because nothing it does can lose a file it did not write itself:

- every `save_local` records, in `reflectune_files.json`, the exact files it wrote (the names of
  the `arrow/` files come from datasets' own `dataset_dict.json` and `state.json`);
- the next write into the folder removes the files the previous manifest lists and this write
  did not write again, and nothing else: a file the user put there, or one written before
  manifests existed, is never listed, so never touched. A listed name is also refused unless it
  is one of the names this layout uses (`README.md`, `summary.json`, `quality.json`,
  `reflectune_config.json`, `plots/*.png`, `data/*.parquet`, datasets' files under `arrow/`)
  and stays inside the folder, so an edited manifest cannot make it remove anything else;
- readers (`reflectune push`) take a run file only when the manifest lists it (`run_file`).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from reflectune_hf.publishing.outputs import read_manifest, remove_stale, write_manifest
    >>> out = Path(tempfile.mkdtemp())
    >>> _ = (out / "quality.json").write_text("{}"), (out / "notes.txt").write_text("mine")
    >>> write_manifest(out, ["quality.json"])
    >>> remove_stale(out, read_manifest(out), current=[])
    ['quality.json']
    >>> sorted(p.name for p in out.iterdir())
    ['notes.txt', 'reflectune_files.json']
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Iterable, Optional

logger = logging.getLogger(__name__)

MANIFEST = "reflectune_files.json"
RUN_RECORD = "reflectune_config.json"  # the run's configuration without secrets: `--config` reproduces the run
PLOT_FILES = {"ifd": "ifd_hist.png", "rifd": "rifd_hist.png", "lengths": "lengths.png",  # report.plot_summary's
              "funnel": "selection_funnel.png"}
OWNED = re.compile(r"(README\.md|summary\.json|quality\.json|reflectune_config\.json|plots/[^/]+\.png"
                   r"|data/[^/]+\.parquet|arrow/([^/]+/)?(dataset_dict\.json|dataset_info\.json|state\.json"
                   r"|data-\d+-of-\d+\.arrow))")


def arrow_files(arrow: Path, splits: Optional[Iterable[str]] = None) -> list[str]:
    """The files the last `save_to_disk` wrote in `arrow` (a DatasetDict of `splits`, or a Dataset
    when None), relative to its parent, as datasets' own `state.json` files name them. What was
    written says which it is: files an earlier write left there (a `state.json` beside a new
    `dataset_dict.json`) are not this write's."""
    def one(folder: Path) -> list[Path]:
        state = json.loads((folder / "state.json").read_text())
        return [folder / "state.json", folder / "dataset_info.json",
                *(folder / f["filename"] for f in state["_data_files"])]

    if splits is None:
        files = one(arrow)
    else:
        files = [arrow / "dataset_dict.json", *(p for split in splits for p in one(arrow / split))]
    return [p.relative_to(arrow.parent).as_posix() for p in files]


def read_manifest(out_dir) -> Optional[list[str]]:
    """The files the manifest of `out_dir` lists, or None when it has none (a folder written
    before manifests, or never by `save_local`)."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    files = json.loads(path.read_text(encoding="utf-8")).get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise ValueError(f"{path}: malformed manifest (expected {{'files': [names]}}); delete it and write the "
                         "folder again")
    return files


def write_manifest(out_dir, files: Iterable[str]) -> None:
    """Record `files` (relative to `out_dir`) as the folder's run files; written atomically."""
    path = Path(out_dir) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps({"files": sorted(set(files))}, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def _owned(out: Path, name: str) -> bool:
    """Whether `name` is a file name of this layout inside `out` (never `..`, never absolute)."""
    if not OWNED.fullmatch(name) or ".." in name.split("/"):
        return False
    return (out / name).resolve().is_relative_to(out.resolve())


def parquet_file(split: str) -> str:
    """The Parquet file of `split` in an output folder (the Hub's layout, one shard)."""
    return f"data/{split}-00000-of-00001.parquet"


def refuse_foreign(out_dir, previous: Optional[Iterable[str]], splits: Iterable[str], quality: bool = False,
                   record: bool = False) -> None:
    """Raise `FileExistsError`, before anything is written, when a file at a fixed name this write
    writes (`README.md`, `summary.json`, plots, `data/<split>-00000-of-00001.parquet`, ...) is in
    the folder and not in its manifest `previous`: it is the user's and writing would replace it. A
    folder without a manifest but with our `reflectune_config.json` is an earlier version's output
    (before manifests, 0.3.1 and older): its files are ours."""
    out = Path(out_dir)
    if previous is None and (out / RUN_RECORD).is_file():
        return
    names = ["README.md", "summary.json", *(["quality.json"] if quality else []), *([RUN_RECORD] if record else []),
             *(f"plots/{p}" for p in PLOT_FILES.values()), *(parquet_file(split) for split in splits)]
    foreign = [name for name in names if (out / name).exists() and name not in set(previous or ())]
    if foreign:
        raise FileExistsError(f"{out} holds {foreign}, which no write of reflectune recorded in {MANIFEST}: they "
                              "would be replaced. Move them, or pick another output folder")


def remove_stale(out_dir, previous: Optional[Iterable[str]], current: Iterable[str]) -> list[str]:
    """Remove the files of `previous` (the last manifest) that are not in `current` (what this
    write wrote), then the folders that this left empty; returns the names removed. Names that
    are not of this layout are kept and logged."""
    out = Path(out_dir)
    removed = []
    for name in sorted(set(previous or ()) - set(current)):
        if not _owned(out, name):
            logger.warning("%s lists %r, which is not a file reflectune writes: kept", out / MANIFEST, name)
            continue
        path = out / name
        if path.is_file() or path.is_symlink():
            path.unlink()
            removed.append(name)
            parent = path.parent
            while parent != out and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
    if removed:
        logger.info("%s: removed %s, written by an earlier run and not by this one", out, removed)
    return removed


def run_file(out_dir, name: str) -> Optional[Path]:
    """The path of the run file `name` (e.g. `quality.json`) of `out_dir` when it belongs to the
    run that wrote the folder: listed in the manifest, or, in a folder without a manifest
    (written before manifests existed), present. None otherwise."""
    path = Path(out_dir) / name
    files = read_manifest(out_dir)
    if files is not None and name not in files:
        if path.is_file():
            logger.warning("%s is not from the run that wrote %s (not in %s): not used", path, out_dir, MANIFEST)
        return None
    return path if path.is_file() else None
