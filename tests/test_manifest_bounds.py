"""A manifest asks for nothing unbounded and says nothing the weights were not exported with, and
an export writes nothing its own reader would refuse.

- ``serving.load`` reads the manifest as strict, bounded JSON (size, nesting, digits, no NaN) and
  checks every entry's exact type and bound before anything is built: one ``ExportError`` naming the
  file and the entry, never a ``RecursionError``, a ``ValueError`` traceback or minutes of building;
- the weights record the manifest entries that decide what the model computes, so an edited
  ``sizes``, ``max_len`` or encoder option is refused, not loaded to score differently;
- ``python -m recsys.export`` refuses a checkpoint with NaN weights or item features before writing.

Each case edits a fresh copy of one small export, under a time limit (a manifest that asks for a
huge model fails the limit instead of hanging the run).
"""

from __future__ import annotations

import json
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import serving
from recsys.item_features import ItemFeatures
from recsys.model import MatryoshkaRecommender
from recsys.export import export_sizes, main
from recsys.export_dir import MAX_MANIFEST_BYTES, SETTINGS, ExportError, sha256_of

N_ITEMS = 20
HISTORIES = [["i01", "i02", "i03"], ["i07"]]


def _checkpoint(path: Path, nan_in: str | None = None) -> Path:
    """A small one-block checkpoint with sizes [8, 16]; ``nan_in`` names a tensor to put a NaN in."""
    torch.manual_seed(0)
    features = ItemFeatures(num_items=N_ITEMS, dense={"text": torch.randn(N_ITEMS + 1, 6)})
    model = MatryoshkaRecommender(item_features=features, sizes=[8, 16], max_len=10, n_blocks=1).eval()
    state = model.state_dict()
    if nan_in is not None:
        state[nan_in].view(-1)[3] = float("nan")
    catalogue = {"item_ids": [f"i{i:02d}" for i in range(1, N_ITEMS + 1)], "popularity": list(range(N_ITEMS, 0, -1))}
    torch.save({"state_dict": state, "hyper_parameters": dict(model.hparams), "catalogue": catalogue}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "model.ckpt")


@pytest.fixture(scope="module")
def export(checkpoint, tmp_path_factory) -> Path:
    (directory,) = export_sizes(checkpoint, [16], tmp_path_factory.mktemp("exports"))
    return directory


@pytest.fixture
def copy(export, tmp_path) -> Path:
    d = tmp_path / "export"
    shutil.copytree(export, d)
    return d


@contextmanager
def _within(seconds: float):
    """Raise TimeoutError in the block once ``seconds`` have passed."""

    def stop(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _edit(change):
    """An edit of the parsed manifest, written back as JSON."""
    def edit(d: Path) -> None:
        manifest = json.loads((d / "manifest.json").read_text())
        change(manifest)
        (d / "manifest.json").write_text(json.dumps(manifest))
    return edit


def _stats(text: str):
    """``data_stats`` (an entry the loader does not use) replaced by raw JSON text."""
    def edit(d: Path) -> None:
        _edit(lambda m: m.update(data_stats="@stats@"))(d)
        path = d / "manifest.json"
        path.write_text(path.read_text().replace('"@stats@"', text))
    return edit


def _options(**changes):
    return _edit(lambda m: m["encoder_options"].update(changes))


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


EXPORTED = r", but model\.safetensors was exported "
TOO_MANY = r"; an export may ask for at most "

# case -> (edit of the export directory, the message the ExportError must match)
CASES = {
    # an edited manifest that would load and score differently (the weights record what they were exported with)
    "sizes [8, 16] edited to [16]": (_edit(lambda m: m.update(sizes=[16])),
                                     r"manifest\.json: 'sizes' is \[16\]" + EXPORTED + r"with \[8, 16\]; the manifest was changed after export$"),
    "max_len edited": (_edit(lambda m: m.update(max_len=5)), r"manifest\.json: 'max_len' is 5" + EXPORTED + "with 10;"),
    "an encoder option edited": (_options(r_max=0.5), r"'encoder_options\.r_max' is 0\.5" + EXPORTED + r"with 0\.1;"),
    "an encoder option added": (_options(bogus=1), r"'encoder_options\.bogus' is 1" + EXPORTED + "without it;"),
    "another encoder": (_edit(lambda m: m.update(encoder="sasrec", encoder_options={"n_blocks": 1})),
                        r"'encoder' is \"sasrec\"" + EXPORTED + r"with \"lru\";"),
    "a width added to a plain export": (_edit(lambda m: m.update(width=16)), r"'width' is 16" + EXPORTED + "without it;"),
    # exact types: an integer is a JSON integer, not 1.0 or true
    "format_version 1.0": (_edit(lambda m: m.update(format_version=1.0)), r"manifest\.json: export format 1\.0, this code reads 1$"),
    "format_version true": (_edit(lambda m: m.update(format_version=True)), r"manifest\.json: export format true, this code reads 1$"),
    "n_blocks true": (_options(n_blocks=True), r"manifest\.json: 'encoder_options\.n_blocks' must be a positive integer, got True$"),
    "sizes not increasing": (_edit(lambda m: m.update(sizes=[8, 8, 16])), r"'sizes' must be strictly increasing, got \[8, 8, 16\]$"),
    # bounded JSON: size, nesting, digits, numbers only
    "10^5 nested brackets": (_stats(_nested(10**5)), r"manifest\.json: the manifest nests brackets more than 32 deep$"),
    "40 nested brackets": (_stats(_nested(40)), r"manifest\.json: the manifest nests brackets more than 32 deep$"),
    "a 5000-digit integer": (_stats("1" * 5000), r"manifest\.json: the manifest holds an integer of 5000 digits; at most 20 are allowed$"),
    "NaN": (_stats("NaN"), r"manifest\.json: the manifest holds NaN, which is not a JSON number$"),
    "a number too large to be finite": (_stats("1e999"), r"manifest\.json: the manifest holds the number 1e999, too large to be finite$"),
    "a manifest of 2 MiB": (_stats(json.dumps("x" * 2 * MAX_MANIFEST_BYTES)),
                            r"manifest\.json: the manifest is \d+ bytes long; a manifest may have at most 1048576$"),
    # bounded entries, checked against the weights before anything is built
    "n_blocks 10**7": (_options(n_blocks=10**7), r"'encoder_options\.n_blocks' is 10000000" + TOO_MANY + "1024$"),
    "n_blocks other than the weights hold": (_options(n_blocks=3), r"model\.safetensors: holds 1 encoder block\(s\), "
                                                                   r"but the manifest's 'encoder_options\.n_blocks' is 3$"),
    "an encoder option of 70000": (_options(ffn_mult=70_000),
                                   r"'encoder_options\.ffn_mult' is 70000; an export may ask for an integer in 0\.\.65536$"),
    "max_len 10**9": (_edit(lambda m: m.update(max_len=10**9)), r"'max_len' is 1000000000" + TOO_MANY + "65536$"),
    "num_items 10**12": (_edit(lambda m: m.update(num_items=10**12)), r"'num_items' is 1000000000000" + TOO_MANY + "2147483648$"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_edited_or_unbounded_manifest_is_one_export_error(copy, case):
    edit, message = CASES[case]
    edit(copy)
    with _within(20), pytest.raises(ExportError, match=message):
        serving.load(copy)


def _rewrite_weights(d: Path, metadata: dict[str, str] | None) -> None:
    """The weights written again with ``metadata`` (None: none, as before the record), checksum updated."""
    save_file(load_file(d / "model.safetensors"), d / "model.safetensors", metadata=metadata)
    _edit(lambda m: m["checksums"].update({"model.safetensors": sha256_of(d / "model.safetensors")}))(d)


def test_an_export_without_the_record_loads_and_scores_the_same(export, copy):
    """Exports written before the weights recorded their settings still load; their n_blocks is
    still checked against the weights before anything is built."""
    _rewrite_weights(copy, None)
    assert serving.load(copy).recommend(HISTORIES, k=5) == serving.load(export).recommend(HISTORIES, k=5)
    _options(n_blocks=10**3)(copy)
    with _within(20), pytest.raises(ExportError, match=r"holds 1 encoder block\(s\), but the manifest's 'encoder_options\.n_blocks' is 1000$"):
        serving.load(copy)


def test_a_record_that_is_not_a_json_object_is_refused(copy):
    _rewrite_weights(copy, {SETTINGS: "[1]"})
    with pytest.raises(ExportError, match=r"model\.safetensors: its record of the export settings must be a JSON object, got list$"):
        serving.load(copy)


@pytest.mark.parametrize("tensor", ["net.items.dense_text", "net.encoder.blocks.0.lru.skip"])
def test_an_export_of_a_checkpoint_with_nan_is_refused_before_anything_is_written(tmp_path, capsys, tensor):
    """A NaN item feature or weight: one line naming the checkpoint and the tensor, exit 2, nothing written."""
    path = _checkpoint(tmp_path / "nan.ckpt", nan_in=tensor)
    out = tmp_path / "exports"
    assert main(["--checkpoint", str(path), "--out", str(out)]) == 2
    line = capsys.readouterr().err.strip()
    assert line == (f"error: {path}: {tensor} holds NaN or infinite values; an export of it could not be loaded, "
                    "so none was written")
    assert not out.exists() or list(out.iterdir()) == []


def test_json_depth_counts_each_level_of_lists_and_objects():
    """The one depth bound the loader and the endpoint share (``recsys/json_depth.py``)."""
    from recsys.json_depth import nests_deeper_than

    assert not nests_deeper_than(7, 0) and nests_deeper_than([], 0) and not nests_deeper_than([], 1)
    assert nests_deeper_than({"a": [1, {}]}, 2) and not nests_deeper_than({"a": [1, {}]}, 3)
    deep = []
    for _ in range(10**5):
        deep = [deep]
    assert nests_deeper_than(deep, 32)


@pytest.fixture(scope="module")
def funnel_export(tmp_path_factory) -> Path:
    """A size-16 own-network funnel (own item vectors for every size): size 8's export in ``shortlist/``."""
    torch.manual_seed(0)
    features = ItemFeatures(num_items=N_ITEMS, dense={"text": torch.randn(N_ITEMS + 1, 6)})
    model = MatryoshkaRecommender(item_features=features, sizes=[8, 16], max_len=10, n_blocks=1,
                                  separate_item_vectors="all").eval()
    path = tmp_path_factory.mktemp("ckpt") / "own.ckpt"
    catalogue = {"item_ids": [f"i{i:02d}" for i in range(1, N_ITEMS + 1)], "popularity": list(range(N_ITEMS, 0, -1))}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "catalogue": catalogue}, path)
    (directory,) = export_sizes(path, [16], tmp_path_factory.mktemp("exports"), funnel_prefix=8, funnel_shortlist=10)
    return directory


#: edits of the shortlist export's manifest (its checksum updated in the outer one) -> the message
NESTED_CASES = {
    "40 nested brackets": (_stats(_nested(40)), r"shortlist/manifest\.json: the manifest nests brackets more than 32 deep$"),
    "max_len edited": (_edit(lambda m: m.update(max_len=5)), r"shortlist/manifest\.json: 'max_len' is 5" + EXPORTED + "with 10;"),
    "num_items 10**12": (_edit(lambda m: m.update(num_items=10**12)), r"'num_items' is 1000000000000" + TOO_MANY + "2147483648$"),
}


@pytest.mark.parametrize("case", list(NESTED_CASES))
def test_the_manifest_of_an_export_inside_another_has_the_same_bounds(funnel_export, tmp_path, case):
    edit, message = NESTED_CASES[case]
    d = tmp_path / "export"
    shutil.copytree(funnel_export, d)
    edit(d / "shortlist")
    _edit(lambda m: m["nested_exports"].update(shortlist=sha256_of(d / "shortlist" / "manifest.json")))(d)
    with _within(20), pytest.raises(ExportError, match=message):
        serving.load(d)
