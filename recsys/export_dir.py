"""An export directory, read safely: its manifest, the checksums of its files, its weights and items.

The format sits below both sides: ``recsys/export.py`` writes it, ``serving`` reads it, and
:func:`fetch_export` copies one out of a model that training logged to MLflow.

An export directory (written by ``recsys/export.py``) holds:

- ``manifest.json``: size, encoder name and options, parameter count, source, data stats, the
  retriever and its settings, and the sha256 of every other file (``"checksums"``);
- ``model.safetensors``: the encoder cut to the size, and the item matrix ``Z[:, :size]``; an
  elastic export (``recsys/nn/grid.py``) also names ``width`` and ``depth``: the encoder is cut to
  that width and depth (``encoder_options.n_blocks`` = depth), the matrix is ``Z[:, :width]``
  (searched at ``Z[:, :size]``), and a vector head maps the state to ``size`` dims when
  ``size < width``; a size trained with ``--model.separate_item_vectors`` (manifest
  ``"separate_item_vectors": true``) also holds ``items.output``, ``(num_items + 1, size)``: its
  own item vectors, which it searches, while histories are read through ``items.matrix``; trained
  with ``--model.output_bias`` too (``"output_bias": true``), ``(num_items + 1, size + 1)``: each
  vector ends in its item's bias, and the user vectors searched with them end in a one;
- ``items.parquet``: ``row`` (1..N), ``item_id`` (the catalogue's original ids), ``popularity``;
- ``index.faiss``: the faiss index of the retriever the manifest names (``"retriever"``, see
  ``recsys/retrieval``), over ``Z[1:, :size]`` or a prefix of it (row r of the index is item row r+1);
- ``shortlist/``: only in an own-network funnel (retriever ``"own_funnel"``, ``OWN_FUNNEL``), the
  complete export of the smaller size whose own network shortlists, listed in ``nested_exports``.

What is checked before any file is used
---------------------------------------
The manifest is the root of trust; every other file must be vouched for by it:

- ``checksums`` is a JSON object of file name -> sha256 that lists ``model.safetensors`` and
  ``items.parquet``; each name is a plain file name (no path separator, not ``.`` or ``..``), so no
  check reads outside the directory;
- the directory holds nothing but ``manifest.json`` and the files ``checksums`` lists, each a plain
  file: a symbolic link (which could lead anywhere), a subdirectory or an unlisted file is refused;
- every listed file is there and has its sha256;
- ``nested_exports`` (optional) is a JSON object of directory name -> sha256 of that directory's
  ``manifest.json``: each such subdirectory (a plain name, a directory, not a link) is an export
  of its own whose manifest has that sha256 and which passes all of these checks itself; it holds
  no nested export in turn. No other subdirectory is allowed.

So every file the loader reads was listed and verified. The manifest's entries the loader uses
have their types checked, the weights must fit the encoder the manifest describes, and the item
table must match the item matrix (one row per item, distinct non-null ids). Anything wrong is an
:class:`ExportError` naming the file and the entry, never a ``KeyError`` or ``TypeError``.

What a manifest may ask for
---------------------------
The manifest is read as strict, bounded JSON before anything is built: at most
``MAX_MANIFEST_BYTES``, nested at most ``MAX_NESTING`` deep, integers of at most ``MAX_DIGITS``
digits, no ``NaN`` or infinite numbers. Its entries have exact types (an integer is a JSON integer,
never ``1.0`` or ``true``; ``sizes`` a strictly increasing list of them) and bounds (``MAX_WIDTH``,
``MAX_LEN``, ``MAX_ITEMS``, ``MAX_BLOCKS``, ``MAX_OPTION``), and ``encoder_options.n_blocks`` must be
the number of encoder blocks the weights hold.

The exporter also writes the entries that decide what the model computes (``RECORDED``: sizes,
encoder, its options, max_len, ...) into ``model.safetensors``'s metadata (``SETTINGS``), which the
checksum covers; the loader refuses a manifest whose entries differ from that record, type
included. Exports written before the record existed have none, and are checked by shapes alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import polars as pl
import torch
from safetensors import SafetensorError, safe_open

from recsys.atomic import AtomicDirectory, reported_write_failures
from recsys.errors import UserError
from recsys.json_depth import nests_deeper_than

__all__ = [
    "ExportError", "FORMAT_VERSION", "MANIFEST", "ITEMS", "OUTPUT_ITEMS", "WEIGHTS", "SETTINGS", "NESTED_EXPORTS",
    "OWN_FUNNEL", "SHORTLIST_EXPORT", "fetch_export", "read_items", "read_manifest", "read_weights", "recorded_settings", "sha256_of",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
ITEMS = "items.parquet"
#: the weight that holds a size's own item vectors (``separate_item_vectors``), searched instead of the matrix
OUTPUT_ITEMS = "items.output"

#: the manifest entry naming the exports inside this one: directory name -> sha256 of its manifest
NESTED_EXPORTS = "nested_exports"
#: the retriever kind whose shortlist is a smaller size's own export (``SHORTLIST_EXPORT``), re-ranked at this size
OWN_FUNNEL = "own_funnel"
SHORTLIST_EXPORT = "shortlist"

#: the metadata entry of ``model.safetensors`` that records the manifest entries below, as JSON
SETTINGS = "export_settings"
#: the manifest entries that decide what the loaded model computes (recorded in the weights too)
RECORDED = ("size", "sizes", "width", "depth", "encoder", "encoder_options", "max_len", "num_items", "separate_item_vectors",
            "output_bias")

#: what a manifest may ask for: its file size, nesting and integer literals ...
MAX_MANIFEST_BYTES = 1 << 20
MAX_NESTING = 32
MAX_DIGITS = 20
#: ... and the largest values of the entries the model is built from
MAX_WIDTH = 1 << 16  # size, width, each of sizes
MAX_LEN = 1 << 16  # max_len (and SASRec's encoder_options.max_len, under MAX_OPTION)
MAX_ITEMS = 1 << 31  # num_items
MAX_BLOCKS = 1 << 10  # encoder_options.n_blocks, depth
MAX_OPTION = 1 << 16  # any other integer of encoder_options

_SHA256 = re.compile(r"[0-9a-f]{64}")
_BLOCK = re.compile(r"encoder\.blocks\.(\d{1,9})\.")
#: manifest entries the loader uses, and the JSON type each must have
_ENTRIES = {"size": int, "sizes": list, "encoder": str, "encoder_options": dict, "max_len": int, "num_items": int}
_TYPE_NAMES = {int: "a positive integer", list: "a list", str: "a string", dict: "a JSON object"}
_LARGEST = {"size": MAX_WIDTH, "max_len": MAX_LEN, "num_items": MAX_ITEMS}


class ExportError(UserError, ValueError):
    """An export directory that is missing, incomplete, corrupted, tampered with or of another format."""


def sha256_of(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def read_manifest(directory: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """The manifest of an export directory, after checking it and (``verify``) every file against it,
    the exports inside it included."""
    return _read_manifest(Path(directory), verify, outer=True)


def _read_manifest(d: Path, verify: bool, outer: bool) -> dict[str, Any]:
    """:func:`read_manifest`; an export that is not ``outer`` (one inside another) may hold no export itself."""
    if not d.is_dir():
        raise ExportError(f"{d}: no such export directory")
    path = d / MANIFEST
    if path.is_symlink():
        raise ExportError(f"{path}: is a symbolic link; an export holds plain files only")
    if not path.is_file():
        raise ExportError(f"{d}: not an export directory (no {MANIFEST}); export one with `python -m recsys.export`")
    manifest = _read_json(path)
    if not isinstance(manifest, dict):
        raise ExportError(f"{path}: the manifest must be a JSON object, got {type(manifest).__name__}")
    _check_format(path, manifest)
    _check_entries(path, manifest)
    _check_sizes(path, manifest)
    _check_encoder_options(path, manifest["encoder_options"])
    _check_depth(path, manifest)
    checksums = _checksums(path, manifest)
    nested = _nested_exports(path, manifest, checksums)
    if nested and not outer:
        raise ExportError(f"{path}: an export inside another export may not hold exports of its own ({NESTED_EXPORTS!r})")
    if verify:
        _verify_files(d, checksums, nested)
        _verify_nested(d, nested)
    return manifest


def _read_json(path: Path) -> Any:
    """The JSON value of the file at ``path``, which may be at most ``MAX_MANIFEST_BYTES`` long."""
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise ExportError(f"{path}: the manifest is {size} bytes long; a manifest may have at most {MAX_MANIFEST_BYTES}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ExportError(f"{path}: manifest is not valid JSON ({exc})") from None
    return _parse_json(text, path, "manifest")


def _parse_json(text: str, path: Path, what: str) -> Any:
    """``text`` parsed as strict JSON within the bounds above; anything else is one ExportError."""
    try:
        value = json.loads(text, parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant)
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: {what} is not valid JSON ({exc})") from None
    except RecursionError:  # the parser recurses once per bracket, so this is far deeper than the bound
        raise _too_deep(path, what) from None
    except ValueError as exc:  # from the three hooks
        raise ExportError(f"{path}: the {what} holds {exc}") from None
    if nests_deeper_than(value, MAX_NESTING):
        raise _too_deep(path, what)
    return value


def _too_deep(path: Path, what: str) -> ExportError:
    return ExportError(f"{path}: the {what} nests brackets more than {MAX_NESTING} deep")


def _json_int(digits: str) -> int:
    """An integer of the JSON text, refused beyond ``MAX_DIGITS`` digits (``int()`` of a long one is slow, or fails)."""
    count = len(digits.lstrip("-"))
    if count > MAX_DIGITS:
        raise ValueError(f"an integer of {count} digits; at most {MAX_DIGITS} are allowed")
    return int(digits)


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:30]}, too large to be finite")
    return value


def _json_constant(name: str) -> float:
    raise ValueError(f"{name}, which is not a JSON number")


def _check_format(path: Path, manifest: dict[str, Any]) -> None:
    """``format_version`` is exactly the integer this code reads (not ``1.0``, not ``true``)."""
    version = manifest.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ExportError(f"{path}: export format {_shown(version)}, this code reads {FORMAT_VERSION}")


def _is_int(value: Any) -> bool:
    """A JSON integer: an ``int`` that is not a ``bool``."""
    return type(value) is int


def _positive_int(path: Path, name: str, value: Any, largest: int) -> None:
    if not _is_int(value) or value < 1:
        raise ExportError(f"{path}: {name!r} must be a positive integer, got {value!r:.80}")
    if value > largest:
        raise ExportError(f"{path}: {name!r} is {value}; an export may ask for at most {largest}")


def _check_entries(path: Path, manifest: dict[str, Any]) -> None:
    """The entries the loader uses are there, each of its JSON type; integers within their bounds."""
    for key, kind in _ENTRIES.items():
        if key not in manifest:
            raise ExportError(f"{path}: the manifest has no {key!r} entry")
        value = manifest[key]
        if kind is int:
            _positive_int(path, key, value, _LARGEST[key])
        elif not isinstance(value, kind):
            raise ExportError(f"{path}: {key!r} must be {_TYPE_NAMES[kind]}, got {value!r:.80}")
    for key in ("separate_item_vectors", "output_bias"):
        if not isinstance(manifest.get(key, False), bool):
            raise ExportError(f"{path}: {key!r} must be true or false, got {manifest[key]!r}")
    if manifest.get("output_bias", False) and not manifest.get("separate_item_vectors", False):
        raise ExportError(f"{path}: 'output_bias' is true, but the biases are a column of separate item vectors, "
                          "which the manifest does not name")


def _check_sizes(path: Path, manifest: dict[str, Any]) -> None:
    """``width`` (elastic exports; else the size) is at least the size; ``sizes`` increase up to it."""
    sizes, size = manifest["sizes"], manifest["size"]
    width = manifest.get("width", size)  # elastic exports: the encoder's width, at least the size
    if not _is_int(width) or not size <= width <= MAX_WIDTH:
        raise ExportError(f"{path}: 'width' must be an integer of at least the size {size} and at most {MAX_WIDTH}, got {width!r}")
    if not sizes or any(not _is_int(s) or s < 1 for s in sizes) or sizes[-1] != width:
        end = f"the width {width}" if "width" in manifest else f"the size {size}"
        raise ExportError(f"{path}: 'sizes' must be positive integers ending with {end}, got {sizes!r:.200}")
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ExportError(f"{path}: 'sizes' must be strictly increasing, got {sizes!r:.200}")


def _check_encoder_options(path: Path, options: dict[str, Any]) -> None:
    """Each option a JSON scalar; ``n_blocks`` (when given) in 1..MAX_BLOCKS, other integers in 0..MAX_OPTION."""
    for name, value in options.items():
        key = f"encoder_options.{name}"
        if isinstance(value, (dict, list)):
            raise ExportError(f"{path}: {key!r} must be a number, a string, true, false or null, got {value!r:.80}")
        if name == "n_blocks":
            _positive_int(path, key, value, MAX_BLOCKS)
        elif _is_int(value) and not 0 <= value <= MAX_OPTION:
            raise ExportError(f"{path}: {key!r} is {value}; an export may ask for an integer in 0..{MAX_OPTION}")


def _check_depth(path: Path, manifest: dict[str, Any]) -> None:
    """An elastic export's ``depth`` is its encoder's number of blocks (``encoder_options.n_blocks``)."""
    if "depth" not in manifest:
        return
    depth = manifest["depth"]
    _positive_int(path, "depth", depth, MAX_BLOCKS)
    blocks = manifest["encoder_options"].get("n_blocks", depth)
    if blocks != depth:
        raise ExportError(f"{path}: 'depth' is {depth}, but 'encoder_options.n_blocks' is {blocks}; they must be the same")


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


def _nested_exports(path: Path, manifest: dict[str, Any], checksums: dict[str, str]) -> dict[str, str]:
    """``nested_exports`` (none when absent): plain directory names, not among the files, each with a sha256."""
    nested = manifest.get(NESTED_EXPORTS, {})
    if not isinstance(nested, dict):
        raise ExportError(f"{path}: {NESTED_EXPORTS!r} must be a JSON object of directory name -> sha256 of its manifest, "
                          f"got {nested!r:.80}")
    for name, digest in nested.items():
        if not _is_plain_name(name) or name in checksums:
            raise ExportError(f"{path}: the nested export entry {name!r} is not the name of a directory inside the export")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ExportError(f"{path}: the manifest checksum of the nested export {name} must be 64 lowercase hex digits, "
                              f"got {digest!r:.80}")
    return nested


def _verify_files(directory: Path, checksums: dict[str, str], nested: dict[str, str]) -> None:
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.name == MANIFEST:
            continue
        if entry.is_symlink():
            raise ExportError(f"{directory}: {entry.name} is a symbolic link; an export holds plain files only")
        if entry.name in nested:
            if not entry.is_dir(follow_symlinks=False):
                raise ExportError(f"{directory}: {entry.name} is listed in {NESTED_EXPORTS!r} but is not a directory")
            continue
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


def _verify_nested(directory: Path, nested: dict[str, str]) -> None:
    """Each nested export is there, its manifest has the listed sha256, and it verifies as a whole export."""
    for name, expected in nested.items():
        manifest = directory / name / MANIFEST
        if not (directory / name).is_dir():  # links and files were refused above
            raise ExportError(f"{directory}: {name} is missing (listed in the manifest's {NESTED_EXPORTS!r})")
        if manifest.is_symlink() or not manifest.is_file():
            raise ExportError(f"{directory / name}: not an export directory (no {MANIFEST} as a plain file)")
        if sha256_of(manifest) != expected:
            raise ExportError(f"{manifest}: checksum mismatch: the file was changed or corrupted after export")
        _read_manifest(directory / name, verify=True, outer=False)


def read_weights(directory: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors``, checked against the manifest before anything is built
    from them: the item matrices' shapes, the number of encoder blocks, the settings the weights
    were exported with (where they record them), and finite values."""
    path = directory / WEIGHTS
    state, metadata = _load_weights(path)
    _check_matrices(path, state, manifest)
    _check_blocks(path, state, manifest["encoder_options"])
    _check_recorded(directory, _recorded(path, metadata), manifest)
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ExportError(f"{path}: {name} holds NaN or infinite values")
    return state


def _load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file, and its metadata (empty when it has none)."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, f.metadata() or {}
    except SafetensorError as exc:
        raise ExportError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None


def _check_matrices(path: Path, state: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
    """The item matrix is ``(num_items + 1, width)``; ``items.output`` is there exactly when the
    manifest names separate item vectors, ``(num_items + 1, size)``, or ``size + 1`` columns with
    ``output_bias``."""
    matrix = state.get("items.matrix")
    expected = (manifest["num_items"] + 1, manifest.get("width", manifest["size"]))
    if matrix is None or tuple(matrix.shape) != expected or not matrix.is_floating_point():
        found = None if matrix is None else f"{tuple(matrix.shape)} {matrix.dtype}"
        raise ExportError(f"{path}: the item matrix must be float of shape {expected} (num_items + 1, width), got {found}")
    output = state.get(OUTPUT_ITEMS)
    if manifest.get("separate_item_vectors", False):
        biased = manifest.get("output_bias", False)
        expected = (manifest["num_items"] + 1, manifest["size"] + biased)
        if output is None or tuple(output.shape) != expected or not output.is_floating_point():
            found = None if output is None else f"{tuple(output.shape)} {output.dtype}"
            raise ExportError(f"{path}: the manifest names separate item vectors, which must be float of shape {expected} "
                              f"(num_items + 1, size{' + 1 for the biases' if biased else ''}) in {OUTPUT_ITEMS}, got {found}")
    elif output is not None:
        raise ExportError(f"{path}: holds {OUTPUT_ITEMS}, but the manifest does not name separate item vectors")


def _check_blocks(path: Path, state: dict[str, torch.Tensor], options: dict[str, Any]) -> None:
    """``encoder_options.n_blocks`` (when given) is the number of encoder blocks the weights hold, so
    no more are ever built."""
    if "n_blocks" not in options:
        return
    found = {int(m.group(1)) for m in map(_BLOCK.match, state) if m}
    held = max(found) + 1 if found else 0
    if options["n_blocks"] != held:
        raise ExportError(f"{path}: holds {held} encoder block(s), but the manifest's 'encoder_options.n_blocks' is "
                          f"{options['n_blocks']}")


def recorded_settings(manifest: dict[str, Any]) -> dict[str, str]:
    """The safetensors metadata an export's weights carry: the manifest's ``RECORDED`` entries, as JSON."""
    return {SETTINGS: json.dumps({key: manifest[key] for key in RECORDED if key in manifest}, sort_keys=True, default=str)}


def _recorded(path: Path, metadata: dict[str, str]) -> dict[str, Any] | None:
    """The settings the weights were exported with (None: written before they were recorded)."""
    text = metadata.get(SETTINGS)
    if text is None:
        return None
    if len(text) > MAX_MANIFEST_BYTES:
        raise ExportError(f"{path}: its record of the export settings is {len(text)} characters; at most {MAX_MANIFEST_BYTES}")
    settings = _parse_json(text, path, "record of the export settings")
    if not isinstance(settings, dict):
        raise ExportError(f"{path}: its record of the export settings must be a JSON object, got {type(settings).__name__}")
    return settings


_UNSET = object()


def _check_recorded(directory: Path, recorded: dict[str, Any] | None, manifest: dict[str, Any]) -> None:
    """Each ``RECORDED`` entry of the manifest is the one the weights were exported with, type included."""
    if recorded is None:
        return
    for key in RECORDED:
        difference = _first_difference(key, manifest.get(key, _UNSET), recorded.get(key, _UNSET))
        if difference is not None:
            name, here, there = difference
            now = "missing" if here is _UNSET else _shown(here)
            then = "without it" if there is _UNSET else f"with {_shown(there)}"
            raise ExportError(f"{directory / MANIFEST}: {name!r} is {now}, but {WEIGHTS} was exported {then}; "
                              "the manifest was changed after export")


def _first_difference(name: str, here: Any, there: Any) -> tuple[str, Any, Any] | None:
    """``(dotted name, here, there)`` of the first value that differs in kind or value, looking into
    JSON objects key by key (``encoder_options.n_blocks``); None when all are the same."""
    if isinstance(here, dict) and isinstance(there, dict):
        for key in sorted(here.keys() | there.keys()):
            difference = _first_difference(f"{name}.{key}", here.get(key, _UNSET), there.get(key, _UNSET))
            if difference is not None:
                return difference
        return None
    same = here is there if here is _UNSET or there is _UNSET else _canonical(here) == _canonical(there)
    return None if same else (name, here, there)


def _canonical(value: Any) -> str:
    """JSON text that tells kinds apart: ``true``, ``1`` and ``1.0`` differ."""
    return json.dumps(value, sort_keys=True)


def _shown(value: Any) -> str:
    return json.dumps(value)[:200]


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


def fetch_export(model_uri: str, dims: list[int] | None, out: Path) -> list[Path]:
    """The export inside the logged model ``model_uri`` (``models:/NAME-d64@champion``, ``runs:/...``),
    copied whole to ``out/d<size>``; ``dims``, if given, must name its size."""
    import mlflow

    with tempfile.TemporaryDirectory() as work:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=work))
        except Exception as exc:
            raise ExportError(f"{model_uri}: cannot be downloaded ({str(exc).splitlines()[0]})") from None
        manifests = list(local.rglob(MANIFEST))
        if not manifests:
            raise ExportError(f"{model_uri}: not a size-specific model logged by recsys.train (no export inside)")
        export_dir = min(manifests, key=lambda p: len(p.parts)).parent  # not an export inside it (shortlist/)
        manifest = read_manifest(export_dir)
        if dims and dims != [manifest["size"]]:
            raise ExportError(f"{model_uri} is the size-{manifest['size']} model; it cannot be exported at {dims}")
        directory = AtomicDirectory(out / f"d{manifest['size']}")
        try:
            with reported_write_failures(out, option=""):
                shutil.copytree(export_dir, directory.path, dirs_exist_ok=True)
            return [directory.commit()]
        except BaseException:
            directory.abort()
            raise
