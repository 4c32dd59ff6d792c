"""``serving.load`` reads only files its manifest lists and verifies, never outside the export, and
turns every edited manifest, weights file or item table into one ``ExportError`` naming the file.

Each case edits a fresh copy of one export (with a faiss index file); where a file's content is
changed, its checksum in the manifest is updated too, as a careless tool or an attacker would, so
that the check behind the checksums is what is tested."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import load_file, save_file

import serving
from recsys.item_features import ItemFeatures
from recsys.model import MatryoshkaRecommender
from recsys.export import export_sizes
from recsys.export_dir import ExportError, sha256_of

N_ITEMS = 20


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    features = ItemFeatures(num_items=N_ITEMS, dense={"text": torch.randn(N_ITEMS + 1, 6)})
    model = MatryoshkaRecommender(item_features=features, sizes=[8, 16], max_len=10).eval()
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    catalogue = {"item_ids": [f"i{i:02d}" for i in range(1, N_ITEMS + 1)], "popularity": list(range(N_ITEMS, 0, -1))}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "catalogue": catalogue}, path)
    (directory,) = export_sizes(path, [16], tmp_path_factory.mktemp("exports"), index="flat")
    return directory


def _manifest(d: Path, change) -> None:
    manifest = json.loads((d / "manifest.json").read_text())
    change(manifest)
    (d / "manifest.json").write_text(json.dumps(manifest))


def _rechecksum(d: Path, name: str) -> None:
    _manifest(d, lambda m: m["checksums"].update({name: sha256_of(d / name)}))


def _flip(d: Path, name: str) -> None:
    data = bytearray((d / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / name).write_bytes(bytes(data))


def _items(change):
    def edit(d: Path) -> None:
        change(pl.read_parquet(d / "items.parquet")).write_parquet(d / "items.parquet")
        _rechecksum(d, "items.parquet")
    return edit


def _weights(change):
    def edit(d: Path) -> None:
        state = load_file(d / "model.safetensors")
        change(state)
        save_file(state, d / "model.safetensors")
        _rechecksum(d, "model.safetensors")
    return edit


#: the weights rewritten without metadata: an export from before they recorded the settings they were exported with
_without_record = _weights(lambda state: None)


def _replace(name: str, content: bytes):
    def edit(d: Path) -> None:
        (d / name).write_bytes(content)
        _rechecksum(d, name)
    return edit


def _link_out(d: Path) -> None:
    """items.parquet replaced by a link to an identical file outside the export: the checksum matches."""
    outside = d.parent / "outside.parquet"
    shutil.copy(d / "items.parquet", outside)
    (d / "items.parquet").unlink()
    os.symlink(outside.resolve(), d / "items.parquet")


def _secret(d: Path) -> str:
    secret = d.parent / "secret.txt"
    secret.write_text("hunter2")
    return sha256_of(secret)


def _first_id(value):
    return lambda t: t.with_columns(pl.when(pl.col("row") == 2).then(value).otherwise(pl.col("item_id")).alias("item_id"))


# case -> (edit of the export directory, the message the ExportError must match)
CASES = {
    # every file the loader reads is listed and verified
    "weights changed, their entry removed": (
        lambda d: (_flip(d, "model.safetensors"), _manifest(d, lambda m: m["checksums"].pop("model.safetensors"))),
        r"manifest\.json: 'checksums' does not list model\.safetensors; every file the loader reads must be listed"),
    "weights changed, checksums emptied": (
        lambda d: (_flip(d, "model.safetensors"), _manifest(d, lambda m: m.update(checksums={}))),
        r"'checksums' does not list model\.safetensors"),
    "index changed, its entry removed": (
        lambda d: (_flip(d, "index.faiss"), _manifest(d, lambda m: m["checksums"].pop("index.faiss"))),
        r"index\.faiss is not listed in the manifest's checksums"),
    "an unlisted file added": (lambda d: (d / "extra.bin").write_bytes(b"x"), r"extra\.bin is not listed in the manifest's checksums"),
    # names stay inside the directory, links do not lead out
    "checksum entry with ../": (
        lambda d: _manifest(d, lambda m: m["checksums"].update({"../secret.txt": _secret(d)})),
        r"the checksum entry '\.\./secret\.txt' is not the name of a file inside the export"),
    "checksum entry with an absolute path": (
        lambda d: _manifest(d, lambda m: m["checksums"].update({str((d.parent / "secret.txt").resolve()): _secret(d)})),
        r"the checksum entry '/.*secret\.txt' is not the name of a file inside the export"),
    "a file is a symbolic link out of the export": (_link_out, r"items\.parquet is a symbolic link; an export holds plain files only"),
    "a subdirectory": (lambda d: (d / "sub").mkdir(), r"sub is not a plain file"),
    # edited manifest: never a KeyError, TypeError or AttributeError
    "manifest is a JSON list": (lambda d: (d / "manifest.json").write_text("[1]"), r"the manifest must be a JSON object, got list"),
    "checksums is a list": (lambda d: _manifest(d, lambda m: m.update(checksums=[])), r"'checksums' must be a JSON object"),
    "checksums missing": (lambda d: _manifest(d, lambda m: m.pop("checksums")), r"'checksums' must be a JSON object"),
    "checksum not hex": (lambda d: _manifest(d, lambda m: m["checksums"].update({"items.parquet": 7})),
                         r"the checksum of items\.parquet must be 64 lowercase hex digits, got 7"),
    "encoder entry missing": (lambda d: _manifest(d, lambda m: m.pop("encoder")), r"the manifest has no 'encoder' entry"),
    "size as text": (lambda d: _manifest(d, lambda m: m.update(size="16")), r"'size' must be a positive integer, got '16'"),
    "max_len not a number": (lambda d: _manifest(d, lambda m: m.update(max_len="x")), r"'max_len' must be a positive integer"),
    "sizes not ending at the size": (lambda d: _manifest(d, lambda m: m.update(sizes=[4, 8])),
                                     r"'sizes' must be positive integers ending with the size 16, got \[4, 8\]"),
    # (on exports from before the weights recorded their settings, where the build is what refuses these;
    # tests/test_manifest_bounds.py: the record refuses them first)
    "unknown encoder option": (lambda d: (_without_record(d), _manifest(d, lambda m: m["encoder_options"].update(bogus=1))),
                               r"the encoder 'lru' cannot be built from the manifest's sizes and encoder_options"),
    "another encoder": (lambda d: (_without_record(d), _manifest(d, lambda m: m.update(encoder="sasrec", encoder_options={}))),
                        r"model\.safetensors: the weights do not fit the encoder the manifest describes"),
    "num_items off by one": (lambda d: _manifest(d, lambda m: m.update(num_items=N_ITEMS + 1)),
                             r"the item matrix must be float of shape \(22, 16\)"),
    "retriever entry a list": (lambda d: _manifest(d, lambda m: m.update(retriever=[1])),
                               r"its retriever cannot be loaded \(a retriever entry must be a JSON object"),
    "retriever setting of the wrong kind": (
        lambda d: _manifest(d, lambda m: m["retriever"]["index"].update(nprobe="x")), r"its retriever cannot be loaded"),
    "index file and its entry removed": (
        lambda d: ((d / "index.faiss").unlink(), _manifest(d, lambda m: m["checksums"].pop("index.faiss"))),
        r"its retriever cannot be loaded \(index file .*index\.faiss does not exist\)"),
    # edited files, checksums updated to match
    "weights not safetensors": (_replace("model.safetensors", b"not safetensors"), r"model\.safetensors: not a readable safetensors file"),
    "weights with NaN": (_weights(lambda s: s["items.matrix"].__setitem__((3, 2), float("nan"))),
                         r"model\.safetensors: items\.matrix holds NaN or infinite values"),
    "index not faiss": (_replace("index.faiss", b"not an index"), r"its retriever cannot be loaded .*not a readable faiss index"),
    "item table not parquet": (_replace("items.parquet", b"not parquet"), r"items\.parquet: not a readable parquet file"),
    "item table without popularity": (_items(lambda t: t.drop("popularity")), r"the item table has no column 'popularity'"),
    "item table with fewer rows": (_items(lambda t: t.head(5)), r"the item table has 5 rows, the manifest says num_items 20"),
    "item table rows out of order": (_items(lambda t: t.with_columns(pl.col("row").reverse())), r"column 'row' must be 1\.\.20 in order"),
    "item table with a repeated id": (_items(_first_id(pl.lit("i01"))), r"item id 'i01' occurs more than once"),
    "item table with a null id": (_items(_first_id(None)), r"column 'item_id' must hold integer or string ids, none null"),
    "item table with text counts": (_items(lambda t: t.with_columns(pl.col("popularity").cast(pl.String))),
                                    r"column 'popularity' must hold counts"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_tampered_export_is_refused_with_one_export_error(export, tmp_path, case):
    _refused_after_edit(export, tmp_path, *CASES[case])


def _refused_after_edit(export, tmp_path, edit, message) -> None:
    """A copy of ``export`` loads; after ``edit`` it is refused with one line matching ``message``."""
    d = tmp_path / "export"
    shutil.copytree(export, d)
    serving.load(d)  # the copy loads before the edit
    edit(d)
    with pytest.raises(ExportError, match=message) as caught:
        serving.load(d)
    assert len(str(caught.value).splitlines()) == 1


def test_an_export_reached_through_a_link_to_its_directory_loads(export, tmp_path):
    """Only links inside the export are refused: ``current -> d16`` is a usual way to deploy."""
    (tmp_path / "current").symlink_to(export, target_is_directory=True)
    assert serving.load(tmp_path / "current").size == 16


# -- an own-network funnel: the export of the smaller size inside it is covered too ---------------------


@pytest.fixture(scope="module")
def funnel_export(tmp_path_factory) -> Path:
    """A size-16 own-network funnel (own item vectors for every size) whose size-8 export, with a
    faiss index, shortlists from ``shortlist/``."""
    torch.manual_seed(0)
    features = ItemFeatures(num_items=N_ITEMS, dense={"text": torch.randn(N_ITEMS + 1, 6)})
    model = MatryoshkaRecommender(item_features=features, sizes=[8, 16], max_len=10, separate_item_vectors="all").eval()
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    catalogue = {"item_ids": [f"i{i:02d}" for i in range(1, N_ITEMS + 1)], "popularity": list(range(N_ITEMS, 0, -1))}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "catalogue": catalogue}, path)
    (directory,) = export_sizes(path, [16], tmp_path_factory.mktemp("exports"), index="flat", funnel_prefix=8,
                                funnel_shortlist=10)
    return directory


def _inner_rechecksum(d: Path, name: str) -> None:
    """A file of the shortlist export re-listed in its manifest, as a careless tool would."""
    _manifest(d / "shortlist", lambda m: m["checksums"].update({name: sha256_of(d / "shortlist" / name)}))


def _nested(change):
    return lambda d: _manifest(d, lambda m: change(m["nested_exports"]))


def _retriever(**changes):
    return lambda d: _manifest(d, lambda m: m["retriever"].update(changes))


def _moved_out(d: Path) -> None:
    shutil.move(d / "shortlist", d.parent / "elsewhere")
    os.symlink((d.parent / "elsewhere").resolve(), d / "shortlist")


def _holds_one_more(d: Path) -> None:
    """The shortlist export names an export of its own (its manifest's checksum updated in the outer one)."""
    _manifest(d / "shortlist", lambda m: m.update(nested_exports={"x": "0" * 64}))
    _manifest(d, lambda m: m["nested_exports"].update(shortlist=sha256_of(d / "shortlist" / "manifest.json")))


NESTED_CASES = {
    "shortlist weights changed": (lambda d: _flip(d / "shortlist", "model.safetensors"),
                                  r"shortlist/model\.safetensors: checksum mismatch"),
    "shortlist index changed, its checksum updated": (
        lambda d: (_flip(d / "shortlist", "index.faiss"), _inner_rechecksum(d, "index.faiss")),
        r"shortlist/manifest\.json: checksum mismatch: the file was changed or corrupted after export$"),
    "shortlist manifest edited": (lambda d: _manifest(d / "shortlist", lambda m: m["retriever"]["index"].update(nprobe=3)),
                                  r"shortlist/manifest\.json: checksum mismatch"),
    "shortlist removed": (lambda d: shutil.rmtree(d / "shortlist"), r"shortlist is missing \(listed in the manifest's 'nested_exports'\)$"),
    "shortlist a file": (lambda d: (shutil.rmtree(d / "shortlist"), (d / "shortlist").write_bytes(b"x")),
                         r"shortlist is listed in 'nested_exports' but is not a directory$"),
    "shortlist a symbolic link out of the export": (_moved_out, r"shortlist is a symbolic link; an export holds plain files only$"),
    "shortlist unlisted": (_nested(lambda n: n.clear()), r"shortlist is not a plain file; an export holds plain files only$"),
    "nested_exports a list": (lambda d: _manifest(d, lambda m: m.update(nested_exports=[])),
                              r"'nested_exports' must be a JSON object of directory name -> sha256 of its manifest, got \[\]$"),
    "nested export entry with ../": (_nested(lambda n: n.update({"../x": "0" * 64})),
                                     r"the nested export entry '\.\./x' is not the name of a directory inside the export$"),
    "nested export digest not hex": (_nested(lambda n: n.update(shortlist="x")),
                                     r"the manifest checksum of the nested export shortlist must be 64 lowercase hex digits"),
    "the shortlist holds an export of its own": (
        _holds_one_more, r"shortlist/manifest\.json: an export inside another export may not hold exports of its own"),
    "retriever names another shortlist export": (
        _retriever(shortlist_export="other"),
        r"its retriever cannot be loaded \(its shortlist export 'other' is not one of the manifest's 'nested_exports'\)$"),
    "prefix_size edited": (_retriever(prefix_size=4),
                           r"its retriever cannot be loaded \(its shortlist export is of size 8; 'prefix_size' is 4 and must be that size"),
    "shortlist 0": (_retriever(shortlist=0), r"its retriever cannot be loaded \(shortlist must be an integer >= 1, got 0\)$"),
    "unknown setting": (_retriever(bogus=1), r"its retriever cannot be loaded \(unknown own_funnel settings \['bogus'\]\)$"),
}


@pytest.mark.parametrize("case", list(NESTED_CASES))
def test_a_tampered_own_funnel_export_is_refused_with_one_export_error(funnel_export, tmp_path, case):
    _refused_after_edit(funnel_export, tmp_path, *NESTED_CASES[case])
