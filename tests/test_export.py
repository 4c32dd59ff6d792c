"""Export at a size, load it back without training code, and serve from it."""

import json
import os
import stat

import numpy as np
import polars as pl
import pytest
import torch
from csv_exports import INT_ITEMS, export_of_log, write_log  # tests/ is on the path

import serving
from recsys.item_features import CategoricalBag, ItemFeatures
from recsys.model import MatryoshkaRecommender
from recsys.nn.nested import cut_to_size, nested_parameter_count
from recsys.export import export_sizes, main as export_main
from serving.sized_model import ExportError, UnknownItemsError

SIZES = [8, 16, 32]
N = 40


def _features() -> ItemFeatures:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 3, (N + 1,), generator=g)
    lengths[0] = 0
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return ItemFeatures(
        num_items=N,
        dense={"text": torch.randn(N + 1, 10, generator=g)},
        bags={"tags": CategoricalBag(torch.randint(0, 6, (int(offsets[-1]),), generator=g), offsets, 6)},
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = MatryoshkaRecommender(item_features=_features(), sizes=SIZES, max_len=12, nesting="blocks").eval()
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    item_ids = [f"item-{i:03d}" for i in range(1, N + 1)]
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "catalogue": {"item_ids": item_ids, "popularity": list(range(N, 0, -1)), "stats": {"users": 5}},
        },
        path,
    )
    return path, model, item_ids


def test_every_size_round_trips_and_matches_the_full_model(checkpoint, tmp_path):
    path, model, item_ids = checkpoint
    dirs = export_sizes(path, SIZES, tmp_path)
    histories = [item_ids[:5], item_ids[10:12], [item_ids[3]]]
    rows = [[int(i.split("-")[1]) for i in h] for h in histories]
    batch = torch.zeros(3, 12, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, -len(r):] = torch.tensor(r)
    with torch.no_grad():
        full = model.net.user_vectors(batch)
    counts = []
    for size, d in zip(SIZES, dirs):
        m = serving.load(d)
        assert m.size == size and m.item_ids == item_ids
        vectors = m.encode(histories)
        assert vectors.shape == (3, size)
        np.testing.assert_allclose(vectors, full[:, :size].numpy(), rtol=1e-5, atol=1e-5)
        counts.append(m.num_parameters)
        assert m.num_parameters == nested_parameter_count(cut_to_size(model.net.encoder, size))
    assert counts == sorted(counts) and counts[0] * 4 < counts[-1]  # genuinely smaller networks


def test_recommend_excludes_seen_and_equals_brute_force(checkpoint, tmp_path):
    path, _, item_ids = checkpoint
    (d,) = export_sizes(path, [16], tmp_path)
    m = serving.load(d)
    history = item_ids[:6]
    got = m.recommend([history], k=10)[0]
    user = torch.from_numpy(m.encode([history]))
    scores = (user @ m.item_matrix[1:].T)[0]
    scores[:6] = -torch.inf
    want = scores.topk(10)
    assert [i for i, _ in got] == [item_ids[j] for j in want.indices.tolist()]
    np.testing.assert_allclose([s for _, s in got], want.values.numpy(), rtol=1e-5)
    assert not set(history) & {i for i, _ in got}


def test_unknown_items_are_reported_and_empty_histories_get_popular_items(checkpoint, tmp_path):
    path, _, item_ids = checkpoint
    (d,) = export_sizes(path, [8], tmp_path)
    m = serving.load(d)
    with pytest.raises(UnknownItemsError, match="1 unknown item id"):
        m.encode([[item_ids[0], "no-such-item"]])
    (recs,) = m.recommend([["no-such-item"]], k=3, on_unknown="skip")
    assert [i for i, _ in recs] == item_ids[:3]  # popularity was N, N-1, ...


def test_wrong_size_and_tampered_files_are_refused(checkpoint, tmp_path):
    path, _, _ = checkpoint
    with pytest.raises(ExportError, match=r"valid sizes: \[8, 16, 32\]"):
        export_sizes(path, [12], tmp_path)
    assert not any(tmp_path.iterdir())
    (d,) = export_sizes(path, [8], tmp_path)
    with open(d / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ExportError, match="checksum mismatch"):
        serving.load(d)
    (d / "manifest.json").unlink()
    with pytest.raises(ExportError, match="not an export directory"):
        serving.load(d)


def test_cli_exports_and_reports_bad_input(checkpoint, tmp_path, capsys):
    path, _, _ = checkpoint
    assert export_main(["--checkpoint", str(path), "--dims", "8,32", "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["d32", "d8"]
    manifest = json.loads((tmp_path / "out" / "d8" / "manifest.json").read_text())
    assert manifest["size"] == 8 and manifest["source"] == {"checkpoint": "model.ckpt"}
    assert export_main(["--checkpoint", str(path), "--dims", "64", "--out", str(tmp_path / "bad")]) == 2
    assert "valid sizes: [8, 16, 32]" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
    assert export_main(["--checkpoint", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "x")]) == 2


def test_funnel_export_with_a_generous_shortlist_equals_exact_search(checkpoint, tmp_path):
    path, _, item_ids = checkpoint
    (exact,) = export_sizes(path, [32], tmp_path / "exact")
    (funnel,) = export_sizes(path, [32], tmp_path / "funnel", funnel_prefix=8, funnel_shortlist=N)
    manifest = json.loads((funnel / "manifest.json").read_text())
    assert manifest["funnel"]["prefix"] == 8 and manifest["funnel"]["rerank_dims"] == [32]
    histories = [item_ids[:5], item_ids[20:23]]
    got, want = serving.load(funnel).recommend(histories, k=10), serving.load(exact).recommend(histories, k=10)
    assert [[i for i, _ in r] for r in got] == [[i for i, _ in r] for r in want]
    np.testing.assert_allclose([[s for _, s in r] for r in got], [[s for _, s in r] for r in want], rtol=1e-5)
    (small,) = export_sizes(path, [32], tmp_path / "small", funnel_prefix=8, funnel_shortlist=15)
    recs = serving.load(small).recommend(histories, k=10)
    assert all(len(r) == 10 and not set(h) & {i for i, _ in r} for r, h in zip(recs, histories))
    with pytest.raises(ExportError, match="funnel prefix must be between 1 and the size 32"):
        export_sizes(path, [32], tmp_path / "bad", funnel_prefix=32)


def _rewrite_manifest(directory, change) -> None:
    """Edit an export's manifest in place (it is not among its own checksums)."""
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest, indent=2))


def test_manifest_names_the_retriever(checkpoint, tmp_path):
    path, _, _ = checkpoint
    (flat,) = export_sizes(path, [16], tmp_path / "flat", index="hnsw")
    manifest = json.loads((flat / "manifest.json").read_text())
    assert manifest["retriever"] == {"kind": "faiss", "index": manifest["index"]}
    assert manifest["index"]["kind"] == "hnsw" and manifest["index"]["ef_search"] == 256  # resolved settings
    assert manifest["funnel"] is None and "index.faiss" in manifest["checksums"]
    (funnel,) = export_sizes(path, [32], tmp_path / "funnel", funnel_prefix=8, funnel_shortlist=15, index="flat")
    manifest = json.loads((funnel / "manifest.json").read_text())
    assert manifest["retriever"] == {
        "kind": "funnel", "prefix": 8, "shortlist": 15, "rerank_dims": [32], "keep": [], "index": {"kind": "flat", "seed": 0},
    }
    assert manifest["funnel"] == {k: v for k, v in manifest["retriever"].items() if k != "kind"}
    assert type(serving.load(funnel).retriever).__name__ == "FunnelRetriever"


def test_the_default_retriever_is_exact_torch_search(checkpoint, tmp_path):
    path, _, _ = checkpoint
    (d,) = export_sizes(path, [16], tmp_path / "default")
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["retriever"] == {"kind": "exact"} and manifest["index"] is None
    assert "index.faiss" not in manifest["checksums"] and not (d / "index.faiss").exists()
    assert type(serving.load(d).retriever).__name__ == "ExactRetriever"
    (funnel,) = export_sizes(path, [32], tmp_path / "funnel", funnel_prefix=8, funnel_shortlist=15)
    entry = json.loads((funnel / "manifest.json").read_text())["retriever"]
    assert entry["kind"] == "funnel" and entry["prefix_retriever"] == {"kind": "exact"} and "index" not in entry


@pytest.mark.parametrize("funnel_prefix", [None, 8])
def test_exports_from_before_the_retriever_entry_still_load(checkpoint, tmp_path, funnel_prefix):
    path, _, item_ids = checkpoint
    (d,) = export_sizes(path, [32], tmp_path, funnel_prefix=funnel_prefix, funnel_shortlist=N)
    histories = [item_ids[:5], item_ids[20:23], []]
    new = serving.load(d)
    expected = new.recommend(histories, k=10)
    _rewrite_manifest(d, lambda m: m.pop("retriever"))  # the manifest the old export code wrote
    old = serving.load(d)
    assert type(old.retriever) is type(new.retriever) and old.retriever.to_dict() == new.retriever.to_dict()
    assert old.recommend(histories, k=10) == expected


def test_every_retriever_kind_recommends_the_exact_top_k(checkpoint, tmp_path):
    path, _, item_ids = checkpoint
    (faiss_dir,) = export_sizes(path, [32], tmp_path / "faiss", index="flat")
    (funnel_dir,) = export_sizes(path, [32], tmp_path / "funnel", funnel_prefix=8, funnel_shortlist=N, index="flat")
    (exact_dir,) = export_sizes(path, [32], tmp_path / "exact")  # the default: exact search, no index file
    histories = [item_ids[:6], item_ids[10:12], [item_ids[3]], item_ids[:N - 4]]
    models = {
        "faiss": serving.load(faiss_dir),
        "funnel": serving.load(funnel_dir),
        "exact": serving.load(exact_dir),
        "use_index=False": serving.SizedRecommender(faiss_dir, use_index=False),
    }
    assert {name: type(m.retriever).__name__ for name, m in models.items()} == {
        "faiss": "FaissRetriever", "funnel": "FunnelRetriever", "exact": "ExactRetriever", "use_index=False": "ExactRetriever",
    }
    m = models["faiss"]
    users = torch.from_numpy(m.encode(histories))
    for name, model in models.items():
        got = model.recommend(histories, k=8)
        for b, history in enumerate(histories):
            scores = users[b] @ m.item_matrix[1:].T
            scores[[item_ids.index(i) for i in history]] = -torch.inf
            allowed = min(8, N - len(history))  # the last history leaves only 4 unseen items
            want = scores.topk(allowed)
            assert [i for i, _ in got[b]] == [item_ids[j] for j in want.indices.tolist()], name
            np.testing.assert_allclose([s for _, s in got[b]], want.values.numpy(), rtol=1e-5, err_msg=name)


def test_recommend_times_its_encode_and_search_stages(checkpoint, tmp_path):
    path, _, item_ids = checkpoint
    (d,) = export_sizes(path, [8], tmp_path)
    m = serving.load(d)
    assert m.stage_seconds == {"encode": 0.0, "search": 0.0}
    m.recommend([item_ids[:3]], k=5)
    assert m.stage_seconds["encode"] > 0 and m.stage_seconds["search"] > 0


def test_ids_that_only_compare_equal_to_catalogue_ids_are_unknown(tmp_path):
    """``True == 1`` and ``1.0 == 1`` in Python, yet neither names item 1 of an integer catalogue."""
    torch.manual_seed(0)
    model = MatryoshkaRecommender(item_features=_features(), sizes=SIZES, max_len=12, nesting="blocks").eval()
    path = tmp_path / "model.ckpt"
    catalogue = {"item_ids": list(range(1, N + 1)), "popularity": list(range(N, 0, -1)), "stats": {}}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "catalogue": catalogue}, path)
    (d,) = export_sizes(path, [SIZES[0]], tmp_path / "exports")
    m = serving.load(d)
    assert m.rows([[1, np.int64(2)]]) == [[1, 2]]
    for history in ([True], [1.0], [2.5]):
        with pytest.raises(serving.UnknownItemsError):
            m.rows([history])


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_integer_ids_of_a_text_log_come_back_as_integers(tmp_path, suffix):
    """Issue 32: a TSV or CSV log of integer ids gives an export that answers with integers, and
    takes them as sent: integers, or their usual spelling as text (serving/item_ids.py)."""
    d = export_of_log(write_log(tmp_path / f"log{suffix}"), tmp_path)
    assert pl.read_parquet(d / "items.parquet").schema["item_id"] == pl.Int64
    m = serving.load(d)
    assert m.item_ids == INT_ITEMS and all(type(i) is int for i in m.item_ids)
    (recs,) = m.recommend([[2, 10]], k=3)
    assert len(recs) == 3 and all(type(item) is int for item, _ in recs) and not {2, 10} & {item for item, _ in recs}
    assert m.recommend([["2", "10"]], k=3) == [recs]  # the text "10" is item 10
    assert m.lookup([["010", "+2", 10.0, True, "x"]]) == ([[]], [["010", "+2", 10.0, True, "x"]])


def test_an_export_of_text_ids_still_answers_with_text(tmp_path):
    """Exports from before issue 32 (a CSV log's integer ids held as text) load and answer as before."""
    torch.manual_seed(0)
    model = MatryoshkaRecommender(item_features=_features(), sizes=SIZES, max_len=12, nesting="blocks").eval()
    path = tmp_path / "model.ckpt"
    catalogue = {"item_ids": [str(i) for i in range(1, N + 1)], "popularity": list(range(N, 0, -1)), "stats": {}}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "catalogue": catalogue}, path)
    (d,) = export_sizes(path, [SIZES[0]], tmp_path / "exports")
    m = serving.load(d)
    assert pl.read_parquet(d / "items.parquet").schema["item_id"] == pl.String
    (recs,) = m.recommend([[1, "2"]], k=3)
    assert all(type(item) is str for item, _ in recs) and m.rows([[1, "2"]]) == [[1, 2]]


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_every_file_of_an_export_has_the_mode_the_umask_gives(checkpoint, tmp_path, mask):
    """Issue 32: model.safetensors was 0600 (safetensors' own mode) beside 0644 files."""
    path, _, _ = checkpoint
    previous = os.umask(mask)
    try:
        (d,) = export_sizes(path, [8], tmp_path, index="flat")
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in d.iterdir()}
    assert set(modes) == {"model.safetensors", "items.parquet", "index.faiss", "manifest.json"}
    assert modes == dict.fromkeys(modes, 0o666 & ~mask), modes


# -- places that cannot be written, a full disk, exports racing, and which errors are the user's ---------


def test_out_that_is_a_file_is_one_line_before_the_checkpoint_is_read(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    missing = str(tmp_path / "no-such.ckpt")  # --out is checked first
    assert export_main(["--checkpoint", missing, "--out", str(tmp_path / "afile")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out {tmp_path / 'afile'} is a file, not a directory"
    assert export_main(["--checkpoint", missing, "--out", str(tmp_path / "afile" / "sub")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out {tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a file, not a directory"


def test_a_read_only_out_is_one_line(checkpoint, tmp_path, capsys):
    path, _, _ = checkpoint
    directory = tmp_path / "read-only"
    directory.mkdir()
    directory.chmod(0o555)
    try:
        try:
            (directory / "probe").write_text("")
            pytest.skip("this user writes into read-only directories (root): run as another user")
        except PermissionError:
            pass
        assert export_main(["--checkpoint", str(path), "--dims", "8", "--out", str(directory / "exports")]) == 2
        assert capsys.readouterr().err.strip().endswith(f"cannot write in {directory} (Permission denied)")
        assert list(directory.iterdir()) == []
    finally:
        directory.chmod(0o755)


@pytest.mark.parametrize("error", ["OSError", "safetensors"])
def test_a_full_disk_is_one_line_and_the_old_export_stays_whole(checkpoint, tmp_path, monkeypatch, capsys, error):
    import errno

    import recsys.export as export
    from safetensors import SafetensorError

    path, _, _ = checkpoint
    out = tmp_path / "exports"
    export_sizes(path, [8], out, source={"export": "old"})

    def disk_full(*args, **kwargs):
        if error == "OSError":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(export, "save_file", disk_full)
    assert export_main(["--checkpoint", str(path), "--dims", "8", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {out}: cannot write there: No space left on device"
    assert [p.name for p in out.iterdir()] == ["d8"] and serving.load(out / "d8").manifest["source"] == {"export": "old"}


def test_retriever_settings_that_do_not_fit_the_model_are_one_line(checkpoint, tmp_path, capsys):
    path, _, _ = checkpoint
    assert export_main(["--checkpoint", str(path), "--dims", "8", "--index", "ivf_pq", "--out", str(tmp_path / "x")]) == 2
    assert "needs at least 256 items to train its codebooks, got 40" in capsys.readouterr().err
    assert export_main(["--checkpoint", str(path), "--dims", "16", "--funnel-prefix", "8", "--funnel-shortlist", "0",
                        "--out", str(tmp_path / "x")]) == 2
    assert "shortlist must be an integer >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_exports_racing_into_one_place_both_succeed_with_a_whole_export(checkpoint, tmp_path):
    """Four processes export the same sizes into one new ``--out`` at once: every one exits 0, and
    each ``d<size>`` is one whole export, with nothing else left."""
    import subprocess
    import sys
    from pathlib import Path

    path, _, _ = checkpoint
    out = tmp_path / "exports"
    root = Path(__file__).resolve().parents[1]
    racers = [
        subprocess.Popen([sys.executable, "-m", "recsys.export", "--checkpoint", str(path), "--dims", "8,16", "--out", str(out)],
                         cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    for racer in racers:
        _, err = racer.communicate(timeout=600)
        assert racer.returncode == 0, err[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["d16", "d8"]
    assert [serving.load(out / d).size for d in ("d8", "d16")] == [8, 16]


def test_the_command_catches_user_errors_only(checkpoint, tmp_path, monkeypatch):
    """A ValueError of our own (a defect) keeps its traceback; it is not shown as a user's error."""
    import recsys.export as export

    path, _, _ = checkpoint

    def defect(*args, **kwargs):
        raise ValueError("a defect in the export")

    monkeypatch.setattr(export, "export_size", defect)
    with pytest.raises(ValueError, match="a defect in the export"):
        export_main(["--checkpoint", str(path), "--dims", "8", "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("output_item_norm", [True, False])
def test_a_size_with_its_own_item_vectors_searches_them_and_reads_histories_through_the_shared_ones(tmp_path, output_item_norm):
    """``--model.separate_item_vectors``: an export of a smaller size holds its own item vectors
    (``items.output``) and recommends by them; the largest size scores the shared matrix as before.
    A width is refused (a funnel shortlists with a smaller size's own export: tests/test_own_funnel.py),
    and so is a manifest that disagrees with the weights. The same with own vectors whose norms are
    free (``--model.output_item_norm false``)."""
    torch.manual_seed(0)
    model = MatryoshkaRecommender(item_features=_features(), sizes=SIZES, max_len=12, nesting="blocks", separate_item_vectors=True,
                                  output_item_norm=output_item_norm).eval()
    path = tmp_path / "model.ckpt"
    item_ids = [f"item-{i:03d}" for i in range(1, N + 1)]
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "catalogue": {"item_ids": item_ids, "popularity": [1] * N, "stats": {}}}, path)
    small, full = export_sizes(path, [8, 32], tmp_path / "out")
    histories = [item_ids[:5], item_ids[10:12]]
    batch = torch.tensor([[0] * 7 + list(range(1, 6)), [0] * 10 + [11, 12]])
    with torch.no_grad():
        users = model.net.user_vectors(batch)
        own = model.item_heads[0]()
        shared = model.net.item_matrix()
    for directory, scores in ((small, users[:, :8] @ own[1:].t()), (full, users @ shared[1:].t())):
        m = serving.load(directory)
        np.testing.assert_allclose(m.encode(histories), users[:, : m.size].numpy(), rtol=1e-5, atol=1e-5)
        for got, row in zip(m.recommend(histories, k=5, exclude_seen=False), scores):
            top = row.topk(5)
            assert [item for item, _ in got] == [item_ids[int(i)] for i in top.indices]
            np.testing.assert_allclose([s for _, s in got], top.values.numpy(), rtol=1e-5, atol=1e-5)
    assert json.loads((small / "manifest.json").read_text())["separate_item_vectors"] is True
    assert json.loads((full / "manifest.json").read_text())["separate_item_vectors"] is False
    with pytest.raises(ExportError, match=r"^size 16 scores items with its own item vectors .*: export it without width or depth$"):
        export_sizes(path, [16], tmp_path / "elastic", width=32)
    _rewrite_manifest(small, lambda m: m.update(separate_item_vectors=False))
    with pytest.raises(ExportError, match="holds items.output, but the manifest does not name separate item vectors"):
        serving.load(small)


def test_a_size_with_output_biases_searches_its_vectors_ending_in_them(tmp_path):
    """``--model.output_bias``: an export holds its size's own item vectors with each item's bias as
    one more column, and searches them with user vectors ending in a one, so that its scores are
    ``u . e_i + b_i`` (through the faiss index too); the manifest says so, and a manifest that
    leaves it out is refused."""
    torch.manual_seed(0)
    model = MatryoshkaRecommender(item_features=_features(), sizes=SIZES, max_len=12, nesting="blocks", separate_item_vectors="all",
                                  output_bias=True).eval()
    with torch.no_grad():
        for bias in model.output_bias:
            bias.copy_(3 * torch.randn_like(bias))
    path = tmp_path / "model.ckpt"
    item_ids = [f"item-{i:03d}" for i in range(1, N + 1)]
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "catalogue": {"item_ids": item_ids, "popularity": [1] * N, "stats": {}}}, path)
    histories = [item_ids[:5], item_ids[10:12]]
    batch = torch.tensor([[0] * 7 + list(range(1, 6)), [0] * 10 + [11, 12]])
    with torch.no_grad():
        users = model.net.user_vectors(batch)
    for index in ("flat", "exact"):
        (small,) = export_sizes(path, [8], tmp_path / index, index=index)
        with torch.no_grad():
            scores = users[:, :8] @ model.item_heads[0]()[1:].t() + model.output_bias[0][1:]
        m = serving.load(small)
        encoded = m.encode(histories)
        np.testing.assert_allclose(encoded, np.c_[users[:, :8].numpy(), np.ones(2)], rtol=1e-5, atol=1e-5)
        for got, row in zip(m.recommend(histories, k=5, exclude_seen=False), scores):
            top = row.topk(5)
            assert [item for item, _ in got] == [item_ids[int(i)] for i in top.indices]
            np.testing.assert_allclose([s for _, s in got], top.values.numpy(), rtol=1e-5, atol=1e-5)
    assert json.loads((small / "manifest.json").read_text())["output_bias"] is True
    _rewrite_manifest(small, lambda m: m.pop("output_bias"))
    with pytest.raises(ExportError, match=r"separate item vectors, which must be float of shape \(41, 8\) .* got \(41, 9\)"):
        serving.load(small)


@pytest.mark.parametrize("lru", [{"post_norm": True, "ffn": "gelu", "ffn_mult": 4}, {}])
def test_lru_options_added_later_travel_with_an_export_and_only_when_set(tmp_path, lru):
    """LRURec's block (``--model.lru.post_norm``, ``--model.lru.ffn gelu``, ``--model.lru.ffn_mult``):
    the export names those options and is served by the same network (its user vectors and its
    recommendations); at their defaults the manifest leaves them out, as before they existed."""
    torch.manual_seed(0)
    model = MatryoshkaRecommender(item_features=_features(), sizes=SIZES, max_len=12, nesting="blocks", lru=lru).eval()
    path = tmp_path / "model.ckpt"
    item_ids = [f"item-{i:03d}" for i in range(1, N + 1)]
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "catalogue": {"item_ids": item_ids, "popularity": [1] * N, "stats": {}}}, path)
    [directory] = export_sizes(path, [16], tmp_path / "out")
    options = json.loads((directory / "manifest.json").read_text())["encoder_options"]
    assert {k: options[k] for k in lru} == lru and not {"post_norm", "ffn", "ffn_mult", "nesting"} - set(lru) & set(options)
    histories = [item_ids[:5], item_ids[10:12]]
    batch = torch.tensor([[0] * 7 + list(range(1, 6)), [0] * 10 + [11, 12]])
    small = cut_to_size(model.net, 16)
    with torch.no_grad():
        items = small.item_matrix()
        users = small.user_vectors(batch, items)
    m = serving.load(directory)
    np.testing.assert_allclose(m.encode(histories), users.numpy(), rtol=1e-5, atol=1e-5)
    for got, row in zip(m.recommend(histories, k=5, exclude_seen=False), users @ items[1:].t()):
        assert [item for item, _ in got] == [item_ids[int(i)] for i in row.topk(5).indices]


def test_a_sliced_size_exports_as_the_dense_network_it_is(tmp_path):
    """``--model.nesting slices``: an export of a size is that size's own network (its weights'
    slices, its own item matrix), a dense network of its width: served vectors and
    recommendations equal those of the model cut to the size; a width is refused (a funnel
    shortlists with a smaller size's own export: tests/test_own_funnel.py)."""
    torch.manual_seed(0)
    model = MatryoshkaRecommender(item_features=_features(), sizes=SIZES, max_len=12, nesting="slices").eval()
    path = tmp_path / "model.ckpt"
    item_ids = [f"item-{i:03d}" for i in range(1, N + 1)]
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "catalogue": {"item_ids": item_ids, "popularity": [1] * N, "stats": {}}}, path)
    dirs = export_sizes(path, SIZES, tmp_path / "out")
    histories = [item_ids[:5], item_ids[10:12]]
    batch = torch.tensor([[0] * 7 + list(range(1, 6)), [0] * 10 + [11, 12]])
    for size, directory in zip(SIZES, dirs):
        small = cut_to_size(model.net, size)
        with torch.no_grad():
            items = small.item_matrix()
            users = small.user_vectors(batch, items)
        m = serving.load(directory)
        assert json.loads((directory / "manifest.json").read_text())["encoder_options"]["nesting"] == "slices"
        np.testing.assert_allclose(m.encode(histories), users.numpy(), rtol=1e-5, atol=1e-5)
        for got, row in zip(m.recommend(histories, k=5, exclude_seen=False), users @ items[1:].t()):
            assert [item for item, _ in got] == [item_ids[int(i)] for i in row.topk(5).indices]
        assert m.num_parameters == nested_parameter_count(small.encoder)
    with pytest.raises(ExportError, match=r"^size 16 is a network of its own .*: export it without width or depth$"):
        export_sizes(path, [16], tmp_path / "elastic", width=32)
