"""Both held-out items of every user: the one run against its twins on validation and on test.

``bench/accuracy.py`` compares a one run's sizes with the sizes trained alone on the test item of
every user. Each user has a second held-out item, the validation one (the item before the test
item), on which every checkpoint was picked. This bench evaluates the same checkpoints on both, from
an accuracy work directory, and asks per size:

- is the one run below its twin on validation, on test, and on the two together (each user's
  NDCG@10 averaged over both items: twice the held-out items, so a narrower interval);
- does the difference drift from validation to test (per user: test difference minus validation
  difference), which a gap seen in test only would show.

Every figure is a mean over the seeds; each interval a paired bootstrap over the users of their
seed-averaged NDCG@10 (``recsys.significance``). The checkpoints are those the runs tested: a
size's own checkpoint of the one run (``best-d{size}.ckpt`` beside its best checkpoint, as with
``--model.monitor_size each``), else its best one; each twin's best one. Their paths come from the
runs' logs in the work directory; each checkpoint's ranks are kept in ``WORKDIR/heldout/``.

    python bench/heldout.py --config configs/sports.yaml --workdir DIR --name sports-cpu-slices-each \
        --sizes 16,32,64 --seeds 0 1 2

writes ``bench/results/heldout_<name>.json`` (its table in docs/results.md: ``tools/results_tables.py``).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import logging
import platform
import sys
from pathlib import Path

import lightning as L
import numpy as np
import yaml

from recsys.atomic import write_json_atomically
from recsys.checkpoint import read_checkpoint
from recsys.data import SequenceDataModule, SyntheticConfig
from recsys.metrics import ndcg_of_ranks
from recsys.model import MatryoshkaRecommender
from recsys.significance import paired_bootstrap

from accuracy import Runs  # (bench/ is the script's directory)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SPLITS = ("val", "test")


def data_module(config: Path, max_len: int | None) -> SequenceDataModule:
    """The held-out users of the config's data (its ``data`` section, as ``recsys.train`` reads it)."""
    if not config.is_file():
        raise SystemExit(f"--config {config}: no such file")
    data = dict((yaml.safe_load(config.read_text()) or {}).get("data") or {})
    if isinstance(data.get("synthetic"), dict):
        data["synthetic"] = SyntheticConfig(**data["synthetic"])
    if max_len is not None:
        data["max_len"] = max_len
    return SequenceDataModule(**data)


def checkpoint_of(workdir: Path, run: str) -> Path:
    """The best checkpoint that run ``run`` of the work directory tested (its result, as
    ``bench/accuracy.py`` reads it)."""
    result = Runs(Path(), workdir, "csv", 1).finished_before(run)
    if result is None:
        raise SystemExit(f"{workdir}: no finished run {run} there (its log's result line or its ranks are missing)")
    best = result.get("best")
    if not best or not Path(best).exists():
        raise SystemExit(f"{workdir / (run + '.log')}: the best checkpoint of {run} ({best}) is gone")
    return Path(best)


def size_checkpoint(best: Path, size: int) -> Path:
    """A size's own checkpoint beside the one run's best one, where the run kept one per size."""
    own = best.parent / f"best-d{size}.ckpt"
    return own if own.exists() else best


def heldout_ranks(checkpoint: Path, size: int, datamodule, cache: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (users, ranks)}``: every held-out user's target rank at ``size`` on validation and
    test, from the checkpoint's own weights (kept in ``cache``, named by the checkpoint's path)."""
    key = hashlib.sha1(f"{checkpoint.resolve()}:{size}".encode()).hexdigest()[:16]
    path = cache / f"{key}.npz"
    if path.exists():
        with np.load(path) as f:
            return {s: (f[f"{s}_users"], f[f"{s}_ranks"]) for s in SPLITS}
    problems = datamodule.resume_problems(read_checkpoint(checkpoint, "cpu").get("data_fingerprint"))
    if problems:
        raise SystemExit(f"{checkpoint}: trained on other data than --config's ({problems[0]})")
    model = MatryoshkaRecommender.from_checkpoint(checkpoint)
    if size not in model.sizes:
        raise SystemExit(f"{checkpoint}: has sizes {list(model.sizes)}, not {size}")
    model.test_checkpoints = None  # this checkpoint's weights at every size
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no device lines per checkpoint
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    out = {}
    for split, loader in (("val", datamodule.val_dataloader()), ("test", datamodule.test_dataloader())):
        trainer.test(model, dataloaders=loader, verbose=False)
        users, ranks = model.last_test_ranks
        out[split] = (users, ranks[list(model.sizes).index(size)])
    cache.mkdir(exist_ok=True)
    np.savez(path, **{f"{s}_{part}": v for s, pair in out.items() for part, v in zip(("users", "ranks"), pair)})
    return out


def seed_averaged(per_seed: list[dict[str, tuple[np.ndarray, np.ndarray]]], what: str) -> dict[str, np.ndarray]:
    """Per split, every user's NDCG@10 averaged over the seeds (the users in one order throughout)."""
    out = {}
    for split in SPLITS:
        users = per_seed[0][split][0]
        if any(not np.array_equal(r[split][0], users) for r in per_seed):
            raise SystemExit(f"{what}: the seeds' checkpoints held out different {split} users")
        out[split] = np.mean([ndcg_of_ranks(r[split][1]) for r in per_seed], axis=0)
    return out


def compare(one: dict[str, np.ndarray], twin: dict[str, np.ndarray], resamples: int) -> dict:
    """One run minus twin per split, on both items together, and the drift from validation to test."""
    rows = {split: paired_bootstrap(one[split], twin[split], resamples=resamples).to_dict() for split in SPLITS}
    rows["both"] = paired_bootstrap((one["val"] + one["test"]) / 2, (twin["val"] + twin["test"]) / 2,
                                    resamples=resamples).to_dict()
    rows["drift"] = paired_bootstrap(one["test"] - one["val"], twin["test"] - twin["val"], resamples=resamples).to_dict()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="the config the work directory's runs trained with")
    parser.add_argument("--workdir", type=Path, required=True, help="a bench/accuracy.py work directory")
    parser.add_argument("--name", required=True, help="names bench/results/heldout_<name>.json")
    parser.add_argument("--sizes", required=True, help="comma-separated sizes with a twin in the work directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--max-len", type=int, default=None, help="as the runs' --data.max_len, if they changed it")
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        raise SystemExit(f"--sizes: comma-separated integers, got {args.sizes!r}") from None
    datamodule = data_module(args.config, args.max_len)
    cache = args.workdir / "heldout"
    command = (f"python bench/heldout.py --config {args.config} --workdir WORKDIR --name {args.name} --sizes {args.sizes} "
               f"--seeds {' '.join(map(str, args.seeds))}" + (f" --max-len {args.max_len}" if args.max_len else ""))
    report = {"name": args.name, "command": command, "config": str(args.config), "seeds": args.seeds,
              "date": datetime.date.today().isoformat(), "machine": platform.machine(), "sizes": []}
    for size in sizes:
        one, twin = [], []
        for seed in args.seeds:
            best = checkpoint_of(args.workdir, f"matryoshka-seed{seed}")
            one.append(heldout_ranks(size_checkpoint(best, size), size, datamodule, cache))
            twin.append(heldout_ranks(checkpoint_of(args.workdir, f"separate-d{size}-seed{seed}"), size, datamodule, cache))
        one_ndcg = seed_averaged(one, f"size {size}'s one runs")
        twin_ndcg = seed_averaged(twin, f"size {size}'s twins")
        row = {"size": size, **{f"{s}_one": float(one_ndcg[s].mean()) for s in SPLITS},
               **{f"{s}_twin": float(twin_ndcg[s].mean()) for s in SPLITS},
               **compare(one_ndcg, twin_ndcg, args.resamples)}
        report["sizes"].append(row)
        print(f"size {size}: val {row['val']['mean']:+.5f}, test {row['test']['mean']:+.5f}, "
              f"both {row['both']['mean']:+.5f}, drift {row['drift']['mean']:+.5f}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    write_json_atomically(RESULTS / f"heldout_{args.name}.json", report)
    print(f"wrote {RESULTS / f'heldout_{args.name}.json'} (its table: tools/results_tables.py, docs/results.md)")


if __name__ == "__main__":
    main(sys.argv[1:])
