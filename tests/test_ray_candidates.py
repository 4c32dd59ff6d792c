"""The Ray Data candidate job against the single-process one: the same candidates, the same manifest,
the same files after a killed actor or a rerun, and the same errors on bad input. One local Ray
instance (2 CPUs) for the module."""

import json

import numpy as np
import polars as pl
import pytest
import torch

ray = pytest.importorskip("ray")

from recsys.data.errors import DataValidationError  # noqa: E402
from recsys.item_features import ItemFeatures  # noqa: E402
from recsys.model import MatryoshkaRecommender  # noqa: E402
from serving.candidates import CandidatesError, generate_candidates  # noqa: E402
from recsys.export import export_sizes  # noqa: E402
import serving.ray_candidates as ray_candidates  # noqa: E402
from serving.ray_candidates import _start_ray, generate_candidates_ray, main  # noqa: E402

N_ITEMS = 40
K = 5
PER_PART = 8  # 31 users -> 4 parts


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    _start_ray(ray, None, 2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    features = ItemFeatures(num_items=N_ITEMS, dense={"text": torch.randn(N_ITEMS + 1, 6, generator=g)})
    model = MatryoshkaRecommender(item_features=features, sizes=[8, 16], max_len=10).eval()
    ckpt = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    popularity = [int(c) for c in torch.randint(1, 100, (N_ITEMS,), generator=g)]
    torch.save(
        {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
         "catalogue": {"item_ids": [f"i{i:02d}" for i in range(1, N_ITEMS + 1)], "popularity": popularity}},
        ckpt,
    )
    (d,) = export_sizes(ckpt, [16], tmp_path_factory.mktemp("export"))
    return d


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    """30 users with tied timestamps and some unknown ids, and one user with only unknown ids."""
    rng = np.random.default_rng(1)
    rows = []
    for user in range(30):
        for _ in range(int(rng.integers(1, 9))):
            item = f"i{int(rng.integers(1, N_ITEMS + 1)):02d}" if rng.random() > 0.1 else f"zz{int(rng.integers(9))}"
            rows.append((user * 7 + 3, item, int(rng.integers(0, 4))))
    rows.append((999, "nope-1", 1))
    path = tmp_path_factory.mktemp("log") / "log.parquet"
    pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row").write_parquet(path)
    return path


@pytest.fixture(scope="module")
def single(export_dir, log, tmp_path_factory):
    """The single-process job's output."""
    out = tmp_path_factory.mktemp("single") / "out"
    manifest = generate_candidates(export_dir, log, out, K, users_per_part=PER_PART, progress=False)
    return out, manifest


@pytest.fixture(scope="module")
def ray_out(export_dir, log, tmp_path_factory):
    """The Ray job's output (2 actors)."""
    out = tmp_path_factory.mktemp("ray") / "out"
    manifest = generate_candidates_ray(export_dir, log, out, K, users_per_part=PER_PART, actors=2, progress=False)
    return out, manifest


def _parts(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("part-*.parquet"))}


def _table(out):
    return pl.read_parquet(sorted(out.glob("part-*.parquet"))).sort("user_id", "rank")


def _same_manifest(a, b):
    """Equal apart from the part checksums (scores may differ in the last float bits) and timings."""
    strip = lambda m: {  # noqa: E731
        **{k: v for k, v in m.items() if k not in ("parts", "elapsed_s")},
        "parts": [{k: v for k, v in p.items() if k != "sha256"} for p in m["parts"]],
    }
    assert strip(a) == strip(b)


def test_same_candidates_and_manifest_as_the_single_process_job(single, ray_out):
    single_out, single_manifest = single
    out, manifest = ray_out
    assert manifest["counts"]["parts"] == 4 and manifest["counts"]["users"] == 31
    _same_manifest(manifest, single_manifest)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in single_out.iterdir() if not p.name.startswith(".")
    )
    assert not (out / ".staging-00000").exists()
    ours, theirs = _table(out), _table(single_out)
    assert ours.schema == theirs.schema
    assert ours.select("user_id", "rank", "item_id").equals(theirs.select("user_id", "rank", "item_id"))
    np.testing.assert_allclose(ours["score"].to_numpy(), theirs["score"].to_numpy(), rtol=1e-5, atol=1e-6)
    # each part file is sorted by user then rank, as the single-process job writes it
    for path in out.glob("part-*.parquet"):
        part = pl.read_parquet(path)
        assert part.equals(part.sort("user_id", "rank"))
    # the manifest on disk is the one returned, with the parts' checksums
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == {k: v for k, v in manifest.items() if k != "elapsed_s"}


def test_a_killed_actor_and_a_rerun_give_byte_identical_parts(export_dir, log, ray_out, tmp_path, monkeypatch):
    clean = ray_out[0]
    expected = _parts(clean)

    # an actor kills its own process on part 2: Ray restarts it and retries the part
    killed = tmp_path / "killed"
    marker = tmp_path / "died"
    monkeypatch.setattr(ray_candidates, "_ACTOR_DIES_AT", (str(marker), 2))
    generate_candidates_ray(export_dir, log, killed, K, users_per_part=PER_PART, progress=False)
    monkeypatch.undo()
    assert marker.exists()  # the actor did die
    assert _parts(killed) == expected
    assert (killed / "manifest.json").read_bytes() == (clean / "manifest.json").read_bytes()  # names no --out

    # the driver died after two parts: the rerun writes the rest, the same bytes
    (killed / "manifest.json").unlink()
    (killed / "part-00000-00001.parquet").unlink()
    (killed / "part-00000-00003.parquet").unlink()
    before = {name: data for name, data in _parts(killed).items()}
    generate_candidates_ray(export_dir, log, killed, K, users_per_part=PER_PART, progress=False)
    assert _parts(killed) == expected
    assert all(_parts(killed)[name] == data for name, data in before.items())
    assert (killed / "manifest.json").read_bytes() == (clean / "manifest.json").read_bytes()

def test_a_rerun_into_another_jobs_output_is_refused_like_the_single_process_job(export_dir, log, ray_out):
    out, manifest = ray_out
    assert generate_candidates_ray(export_dir, log, out, K, users_per_part=PER_PART)["parts"] == manifest["parts"]
    with pytest.raises(CandidatesError, match=r"different job \(k: 5 there, 6 now\)"):
        generate_candidates_ray(export_dir, log, out, K + 1, users_per_part=PER_PART, progress=False)


def _bad_inputs(tmp_path):
    missing = tmp_path / "missing.parquet"
    pl.DataFrame({"user": [1], "item_id": ["i01"], "timestamp": [1]}).write_parquet(missing)
    null_user = tmp_path / "null.csv"
    null_user.write_text("user_id,item_id,timestamp\n1,i01,1\n,i02,2\n")
    bad_time = tmp_path / "time.csv"
    bad_time.write_text("user_id,item_id,timestamp\n1,i01,1\n2,i02,yesterday\n")
    return [
        (missing, {}), (null_user, {}), (bad_time, {}),
        (tmp_path / "missing.parquet", {"k": N_ITEMS + 1}),
        (tmp_path / "missing.parquet", {"shard": "3/2"}),
    ]


def test_bad_input_errors_as_the_single_process_job_and_writes_nothing(export_dir, tmp_path):
    for i, (path, options) in enumerate(_bad_inputs(tmp_path)):
        options = {"k": K, **options}
        with pytest.raises((DataValidationError, CandidatesError)) as theirs:
            generate_candidates(export_dir, path, tmp_path / f"single{i}", progress=False, **options)
        with pytest.raises(type(theirs.value)) as ours:
            generate_candidates_ray(export_dir, path, tmp_path / f"ray{i}", progress=False, **options)
        assert str(ours.value).replace(f"ray{i}", "OUT") == str(theirs.value).replace(f"single{i}", "OUT")
        assert not (tmp_path / f"ray{i}").exists()
    with pytest.raises(CandidatesError, match="actors must be a positive integer"):
        generate_candidates_ray(export_dir, path, tmp_path / "x", K, actors=0)


def test_cli(export_dir, log, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", str(export_dir), "--input", str(log), "--out", str(out), "--k", str(K),
            "--users-per-part", str(PER_PART), "--actors", "1"]
    assert main(args) == 0
    assert "31 users" in capsys.readouterr().out
    assert main([*args[:-2], "--actors", "1", "--shard", "5/2"]) != 0
    assert "--shard must be i/n" in capsys.readouterr().err
