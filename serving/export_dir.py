"""An export directory, read safely: its manifest, the checksums of its files, its weights and items.

An export directory (written by ``serving/export.py``) holds:

- ``manifest.json``: size, encoder name and options, parameter count, source, data stats, the
  retriever and its settings, and the sha256 of every other file (``"checksums"``);
- ``model.safetensors``: the encoder cut to the size, and the item matrix ``Z[:, :size]``; an
  elastic export (``recsys/nn/grid.py``) also names ``width`` and ``depth``: the encoder is cut to
  that width and depth (``encoder_options.n_blocks`` = depth), the matrix is ``Z[:, :width]``
  (searched at ``Z[:, :size]``), and a vector head maps the state to ``size`` dims when
  ``size < width``; a size trained with ``--model.separate_item_vectors`` (manifest
  ``"separate_item_vectors": true``) also holds ``items.output``, ``(num_items + 1, size)``: its
  own item vectors, which it searches, while histories are read through ``items.matrix``;
- ``items.parquet``: ``row`` (1..N), ``item_id`` (the catalogue's original ids), ``popularity``;
- ``index.faiss``: the faiss index of the retriever the manifest names (``"retriever"``, see
  ``serving/retrieval``), over ``Z[1:, :size]`` or a prefix of it (row r of the index is item row r+1).

What is checked before any file is used
---------------------------------------
The manifest is the root of trust; every other file must be vouched for by it:

- ``checksums`` is a JSON object of file name -> sha256 that lists ``model.safetensors`` and
  ``items.parquet``; each name is a plain file name (no path separator, not ``.`` or ``..``), so no
  check reads outside the directory;
- the directory holds nothing but ``manifest.json`` and the files ``checksums`` lists, each a plain
  file: a symbolic link (which could lead anywhere), a subdirectory or an unlisted file is refused;
- every listed file is there and has its sha256.

So every file the loader reads was listed and verified. The manifest's entries the loader uses
have their types checked, the weights must fit the encoder the manifest describes, and the item
table must match the item matrix (one row per item, distinct non-null ids). Anything wrong is an
:class:`ExportError` naming the file and the entry, never a ``KeyError`` or ``TypeError``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import polars as pl
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from recsys.errors import UserError

__all__ = [
    "ExportError", "FORMAT_VERSION", "MANIFEST", "ITEMS", "OUTPUT_ITEMS", "WEIGHTS", "read_items", "read_manifest", "read_weights", "sha256_of",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
ITEMS = "items.parquet"
#: the weight that holds a size's own item vectors (``separate_item_vectors``), searched instead of the matrix
OUTPUT_ITEMS = "items.output"

_SHA256 = re.compile(r"[0-9a-f]{64}")
#: manifest entries the loader uses, and the JSON type each must have
_ENTRIES = {"size": int, "sizes": list, "encoder": str, "encoder_options": dict, "max_len": int, "num_items": int}
_TYPE_NAMES = {int: "a positive integer", list: "a list", str: "a string", dict: "a JSON object"}


class ExportError(UserError, ValueError):
    """An export directory that is missing, incomplete, corrupted, tampered with or of another format."""


def sha256_of(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def read_manifest(directory: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """The manifest of an export directory, after checking it and (``verify``) every file against it."""
    d = Path(directory)
    if not d.is_dir():
        raise ExportError(f"{d}: no such export directory")
    path = d / MANIFEST
    if path.is_symlink():
        raise ExportError(f"{path}: is a symbolic link; an export holds plain files only")
    if not path.is_file():
        raise ExportError(f"{d}: not an export directory (no {MANIFEST}); export one with `python -m serving.export`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path}: manifest is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise ExportError(f"{path}: the manifest must be a JSON object, got {type(manifest).__name__}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path}: export format {manifest.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    _check_entries(path, manifest)
    checksums = _checksums(path, manifest)
    if verify:
        _verify_files(d, checksums)
    return manifest


def _check_entries(path: Path, manifest: dict[str, Any]) -> None:
    for key, kind in _ENTRIES.items():
        if key not in manifest:
            raise ExportError(f"{path}: the manifest has no {key!r} entry")
        value = manifest[key]
        if isinstance(value, bool) or not isinstance(value, kind) or (kind is int and value < 1):
            raise ExportError(f"{path}: {key!r} must be {_TYPE_NAMES[kind]}, got {value!r}")
    if not isinstance(manifest.get("separate_item_vectors", False), bool):
        raise ExportError(f"{path}: 'separate_item_vectors' must be true or false, got {manifest['separate_item_vectors']!r}")
    sizes, size = manifest["sizes"], manifest["size"]
    width = manifest.get("width", size)  # elastic exports: the encoder's width, at least the size
    if isinstance(width, bool) or not isinstance(width, int) or width < size:
        raise ExportError(f"{path}: 'width' must be an integer of at least the size {size}, got {width!r}")
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes) or sizes[-1] != width:
        end = f"the width {width}" if "width" in manifest else f"the size {size}"
        raise ExportError(f"{path}: 'sizes' must be positive integers ending with {end}, got {sizes!r}")


def _is_plain_name(name: Any) -> bool:
    """A file name directly inside the directory: no separator, not ``.``/``..``, not the manifest."""
    return (
        isinstance(name, str) and name not in ("", ".", "..", MANIFEST)
        and not any(c in name for c in ("/", "\\", "\0"))
    )


def _checksums(path: Path, manifest: dict[str, Any]) -> dict[str, str]:
    checksums = manifest.get("checksums")
    if not isinstance(checksums, dict):
        raise ExportError(f"{path}: 'checksums' must be a JSON object of file name -> sha256, got {checksums!r:.80}")
    for name, digest in checksums.items():
        if not _is_plain_name(name):
            raise ExportError(f"{path}: the checksum entry {name!r} is not the name of a file inside the export")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ExportError(f"{path}: the checksum of {name} must be 64 lowercase hex digits, got {digest!r:.80}")
    for name in (WEIGHTS, ITEMS):
        if name not in checksums:
            raise ExportError(f"{path}: 'checksums' does not list {name}; every file the loader reads must be listed")
    return checksums


def _verify_files(directory: Path, checksums: dict[str, str]) -> None:
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.name == MANIFEST:
            continue
        if entry.is_symlink():
            raise ExportError(f"{directory}: {entry.name} is a symbolic link; an export holds plain files only")
        if not entry.is_file(follow_symlinks=False):
            raise ExportError(f"{directory}: {entry.name} is not a plain file; an export holds plain files only")
        if entry.name not in checksums:
            raise ExportError(
                f"{directory}: {entry.name} is not listed in the manifest's checksums; "
                "an export holds only the files its manifest lists"
            )
    for name, expected in checksums.items():
        file = directory / name
        if not file.is_file():  # every file there was checked above: no links, no directories
            raise ExportError(f"{directory}: {name} is missing (listed in the manifest)")
        if sha256_of(file) != expected:
            raise ExportError(f"{file}: checksum mismatch: the file was changed or corrupted after export")


def read_weights(directory: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors``: finite, with an item matrix of ``(num_items + 1, size)``."""
    path = directory / WEIGHTS
    try:
        state = load_file(path, device="cpu")
    except SafetensorError as exc:
        raise ExportError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
    matrix = state.get("items.matrix")
    expected = (manifest["num_items"] + 1, manifest.get("width", manifest["size"]))
    if matrix is None or tuple(matrix.shape) != expected or not matrix.is_floating_point():
        found = None if matrix is None else f"{tuple(matrix.shape)} {matrix.dtype}"
        raise ExportError(f"{path}: the item matrix must be float of shape {expected} (num_items + 1, width), got {found}")
    output = state.get(OUTPUT_ITEMS)
    if manifest.get("separate_item_vectors", False):
        expected = (manifest["num_items"] + 1, manifest["size"])
        if output is None or tuple(output.shape) != expected or not output.is_floating_point():
            found = None if output is None else f"{tuple(output.shape)} {output.dtype}"
            raise ExportError(f"{path}: the manifest names separate item vectors, which must be float of shape {expected} "
                              f"(num_items + 1, size) in {OUTPUT_ITEMS}, got {found}")
    elif output is not None:
        raise ExportError(f"{path}: holds {OUTPUT_ITEMS}, but the manifest does not name separate item vectors")
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ExportError(f"{path}: {name} holds NaN or infinite values")
    return state


def read_items(directory: Path, num_items: int) -> pl.DataFrame:
    """``items.parquet``: rows 1..``num_items`` in order, distinct non-null ids, counts of at least 0."""
    path = directory / ITEMS
    try:
        items = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise ExportError(f"{path}: not a readable parquet file ({_first_line(exc)})") from None
    missing = [c for c in ("row", "item_id", "popularity") if c not in items.columns]
    if missing:
        raise ExportError(f"{path}: the item table has no column {missing[0]!r}")
    if items.height != num_items:
        raise ExportError(f"{path}: the item table has {items.height} rows, the manifest says num_items {num_items}")
    row, ids, popularity = items["row"], items["item_id"], items["popularity"]
    if not row.dtype.is_integer() or not row.equals(pl.Series("row", range(1, num_items + 1)), check_dtypes=False):
        raise ExportError(f"{path}: column 'row' must be 1..{num_items} in order")
    if not (ids.dtype.is_integer() or ids.dtype == pl.String) or ids.null_count():
        raise ExportError(f"{path}: column 'item_id' must hold integer or string ids, none null (got {ids.dtype}, "
                          f"{ids.null_count()} null)")
    if ids.n_unique() != num_items:
        repeated = ids.filter(ids.is_duplicated())[0]
        raise ExportError(f"{path}: item id {repeated!r} occurs more than once")
    if not popularity.dtype.is_integer() or popularity.null_count() or popularity.min() < 0:
        raise ExportError(f"{path}: column 'popularity' must hold counts (integers >= 0, none null)")
    return items
