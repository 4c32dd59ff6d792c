"""Which code each entry point imports: serving runs without the training code, the models without the
data pipeline, and a data submodule without Lightning.

Each check runs in a fresh interpreter, since this test process has imported everything already.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from recsys.item_features import CategoricalBag, ItemFeatures

ROOT = Path(__file__).resolve().parents[1]
#: never imported by serving.load, nor by the models
TRAINING_ONLY = ["lightning", "mlflow", "recsys.data", "sentence_transformers", "transformers"]
N = 30


def _imported(script: str, *args: str, watch: list[str]) -> list[str]:
    """Run ``script`` in a fresh interpreter; the names of ``watch`` (or their submodules) it imported."""
    probe = textwrap.dedent(script) + textwrap.dedent(
        f"""
        import json, sys
        watch = {watch!r}
        print(json.dumps(sorted(w for w in watch if any(m == w or m.startswith(w + ".") for m in sys.modules))))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-c", probe, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _export(directory: Path) -> tuple[Path, list[str]]:
    """A tiny model with a text vector, a tag bag and an ID table, exported at one size."""
    from recsys.model import MatryoshkaRecommender
    from recsys.export import export_sizes

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 3, (N + 1,), generator=g)
    lengths[0] = 0
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    features = ItemFeatures(
        num_items=N,
        dense={"text": torch.randn(N + 1, 6, generator=g)},
        bags={"tags": CategoricalBag(torch.randint(0, 5, (int(offsets[-1]),), generator=g), offsets, 5)},
    )
    torch.manual_seed(0)
    model = MatryoshkaRecommender(item_features=features, sizes=[8, 16], max_len=10, use_id_embedding=True).eval()
    item_ids = [f"item-{i}" for i in range(1, N + 1)]
    checkpoint = directory / "model.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "catalogue": {"item_ids": item_ids, "popularity": list(range(N, 0, -1)), "stats": {}},
        },
        checkpoint,
    )
    (path,) = export_sizes(checkpoint, [8], directory / "exports")
    return path, item_ids


def test_serving_load_and_recommend_import_no_training_code(tmp_path):
    export_dir, item_ids = _export(tmp_path)
    script = """
        import sys
        import serving
        m = serving.load(sys.argv[1])
        top = m.recommend([sys.argv[2:]], k=5)
        assert len(top[0]) == 5, top
    """
    # torchrec: a served model's item matrix is fixed, so no embedding table is built
    assert _imported(script, str(export_dir), *item_ids[:4], watch=[*TRAINING_ONLY, "torchrec"]) == []


def test_the_models_import_without_the_data_pipeline():
    script = """
        import recsys.item_features, recsys.nn.embedding_tables, recsys.nn.encoders, recsys.nn.item_tower
        import recsys.nn.loss, recsys.nn.lru, recsys.nn.mamba, recsys.nn.nested, recsys.nn.recommender, recsys.nn.sasrec
    """
    assert _imported(script, watch=[*TRAINING_ONLY, "polars", "torchrec"]) == []


def test_the_feature_containers_are_a_leaf():
    script = """
        from recsys.item_features import CategoricalBag, ItemFeatures
    """
    assert _imported(script, watch=["recsys.data", "recsys.nn", "polars", "lightning", "torchrec"]) == []


def test_a_data_submodule_does_not_import_lightning():
    script = """
        import recsys.data.readers, recsys.data.time_order, recsys.data.errors
        from recsys.data import DataValidationError
    """
    assert _imported(script, watch=["lightning", "torch", "recsys.data.datamodule", "recsys.data.pipeline"]) == []


def test_prepare_help_imports_neither_torch_nor_the_pipeline():
    script = """
        import runpy, sys
        sys.argv = ["recsys.data", "prepare", "--help"]
        try:
            runpy.run_module("recsys.data", run_name="__main__")
        except SystemExit as exit:
            assert exit.code == 0, exit.code
    """
    assert _imported(script, watch=["torch", "lightning", "recsys.data.pipeline"]) == []


def test_the_data_package_names_the_leaf_classes():
    import recsys.data
    import recsys.item_features as leaf
    from recsys.data import CategoricalBag as Bag
    from recsys.data import ItemFeatures as Features

    assert Features is leaf.ItemFeatures
    assert Bag is leaf.CategoricalBag
    assert set(recsys.data.__all__) <= set(dir(recsys.data))
    for name in recsys.data.__all__:
        assert getattr(recsys.data, name) is not None


def _import_drawing() -> dict[str, set[str]]:
    """Which of the project's modules each module of ``recsys`` and ``serving`` imports anywhere (at
    the top or inside a function), by name: ``{module: {module it imports}}``."""
    def name_of(path: Path) -> str:
        parts = path.relative_to(ROOT).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {name_of(p): p for package in ("recsys", "serving") for p in (ROOT / package).rglob("*.py")}

    def project_module(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    drawing = {}
    for module, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            imported |= {m for n in names if (m := project_module(n)) and not (module + ".").startswith(m + ".")}
        drawing[module] = imported
    return drawing


def test_the_training_side_never_imports_serving():
    """Training turns a trained model into exports (``recsys.export``, ``recsys.logged_models``);
    serving reads them. A logged model names ``serving/pyfunc.py`` as a file, not as an import."""
    drawing = _import_drawing()
    arrows = sorted((a, b) for a, imported in drawing.items() if a.startswith("recsys") for b in imported
                    if b.startswith("serving"))
    assert arrows == []


def test_no_modules_import_each_other_in_a_circle():
    drawing = _import_drawing()
    reaches = {m: set(imported) for m, imported in drawing.items()}
    changed = True
    while changed:  # the closure of the drawing: everything each module reaches
        changed = False
        for module, reached in reaches.items():
            more = set().union(*(reaches[m] for m in reached)) - reached
            if more:
                reached |= more
                changed = True
    assert sorted(m for m, reached in reaches.items() if m in reached) == []


def test_the_earlier_names_of_the_export_command_and_retrieval_still_work(tmp_path):
    import recsys.export
    import recsys.retrieval
    import serving.export
    import serving.retrieval

    assert serving.export.export_sizes is recsys.export.export_sizes
    assert all(getattr(serving.retrieval, name) is getattr(recsys.retrieval, name) for name in recsys.retrieval.__all__)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "serving.export", "--checkpoint", str(tmp_path / "none.ckpt"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 2 and "none.ckpt: no such checkpoint file" in done.stderr, done.stderr
