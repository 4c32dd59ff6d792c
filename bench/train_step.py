"""Training-step throughput against the arithmetic floor, random against length-aware batches (bench/README.md §6).

For each dataset (a prepared directory, trained with ``configs/<name>.yaml``'s model and data
settings) and each encoder (LRU, Mamba, SASRec), the whole training step of
:class:`~recsys.model.MatryoshkaRecommender` runs on the data module's own batches: item tower,
encoder, Matryoshka loss (the forward as ``training_step`` computes it, each part timed), backward,
gradient clipping and the AdamW update. Two batchings:

- ``padded``: random batches (``--data.length_batching false``, the order before issue 14), each
  padded to its longest window;
- ``length``: length-aware batches (``recsys/data/length_batching.py``, the default).

Which steps: ``--steps`` batches of each batching's epoch 0, spread over the epoch's batch widths
(the batches sorted by width and cut into ``--steps`` equal slices, from each the batch nearest the
slice's mean width), so that their mean step time estimates the epoch's; the two batchings take turns step by step, so
load on a shared machine hits both alike. The epoch time is that mean times the epoch's number of
batches (the same for both): extrapolated, not timed whole; the JSON says so.

Figures per (dataset, encoder, batching): median and mean step time; real positions per second
(real input positions over step time); the real fraction of encoded positions over the whole epoch
(every batch, not a sample); and the fraction of the arithmetic floor: each timed batch's step is
run once more under ``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions
and attention, forward and backward; element-wise work such as the LRU's scan counts nothing), and
floor = counted flops / the float32 matrix-product rate measured just before that encoder's steps,
fraction = floor / measured step time; also at the highest rate measured in the run (the start, the
end and before each encoder), the conservative figure on a shared machine, which the README reports.

    python bench/train_step.py --data sports=data/sports ml-1m=data/ml-1m     # writes bench/results/train_step.json
    python bench/train_step.py --data sports=data/sports --encoders lru --steps 4 --out lru_sports.json
    python bench/train_step.py --data ml-1m=data/ml-1m --device cuda --precision bf16 --out bf16.json

``--precision`` picks the arithmetic: ``fp32`` (float32 products, no TF32), ``tf32`` (float32
products on TF32 tensor cores, GPU) or ``bf16`` (the forward under bf16 autocast, parameters and
optimizer in float32); the floor's rate is measured at that precision. The default, ``auto``, is
what ``python -m recsys.train`` of the measured package picks on this machine. On a GPU
(``--device cuda``) the batches are moved there before their steps and every phase ends with a
synchronisation. The step's loss is each config's own (``--loss`` overrides it).

``--baseline REV`` (bench/README.md §6) times the package of commit REV beside this checkout's,
each in a process of its own as it trains by default, and writes both with their ratios:

    python bench/train_step.py --data sports=data/sports ml-1m=data/ml-1m --encoders lru sasrec --steps 8 \
        --steps-for ml-1m:lru=5 ml-1m:sasrec=5 --batchings length --baseline 2fd92c9 --out bench/results/train_speed.json
``initial_loss`` (the loss of the first batch before any update, the same weights at every
precision) shows how far a precision moves the numbers.

Machines here are shared and noisy: compare the batchings by the ratios within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from baseline import unpack_commit  # bench/baseline.py (the script directory is on sys.path)
from machine import cpu_model, matmul_gflops  # bench/machine.py

ROOT = Path(__file__).resolve().parents[1]
# the package measured: this checkout's, or with --package an earlier commit's (the baseline arm)
_PACKAGE = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--package=")), str(ROOT))
sys.path.insert(0, _PACKAGE)

from recsys.atomic import write_json_atomically  # noqa: E402
from recsys.data.datamodule import SequenceDataModule  # noqa: E402
from recsys.data.length_batching import real_fraction  # noqa: E402
from recsys.model import MatryoshkaRecommender  # noqa: E402

# the process settings a training run of this package makes (none before issue 30); looked up in the
# package's own directory, since the editable install would otherwise supply this checkout's
if (Path(_PACKAGE) / "recsys" / "runtime.py").is_file():
    from recsys.runtime import default_precision, reuse_freed_memory  # noqa: E402
else:
    default_precision = reuse_freed_memory = None

logger = logging.getLogger("bench.train_step")

ENCODERS = ("lru", "mamba", "sasrec")
BATCHINGS = ("padded", "length")
# the model settings read from a dataset's config (the rest keep the model's defaults)
MODEL_KEYS = ("sizes", "n_blocks", "dropout", "input_dropout", "use_id_embedding", "lru", "mamba", "sasrec", "loss_block_rows",
              "loss", "negatives", "negative_sampling")
# the Trainer's gradient clipping (recsys.model.TRAINER_DEFAULTS) is part of the step
CLIP = 1.0
PRECISIONS = ("fp32", "tf32", "bf16")


def use_precision(precision: str) -> None:
    """Float32 products with TF32 (``tf32``) or without (``fp32``, ``bf16``: bf16 comes from autocast)."""
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32


def rate_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def dataset_settings(name: str) -> tuple[dict, dict]:
    """``(model settings, data settings)`` of ``configs/<name>.yaml``."""
    config = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    model = {k: v for k, v in (config.get("model") or {}).items() if k in MODEL_KEYS}
    data = config.get("data") or {}
    return model, {"max_len": int(data.get("max_len", 50)), "batch_size": int(data.get("batch_size", 128))}


def spread_sample(widths: np.ndarray, steps: int) -> list[int]:
    """Indices of ``steps`` batches spread over the sorted ``widths``: the batches sorted by width are
    cut into ``steps`` equal slices, and from each the batch whose width is nearest the slice's mean
    (a step's time grows with its width, so the sample's mean time tracks the epoch's)."""
    slices = np.array_split(np.argsort(widths, kind="stable"), min(steps, len(widths)))
    return [int(s[np.argmin(np.abs(widths[s] - widths[s].mean()))]) for s in slices]


PHASES = ("tower", "encoder", "loss", "backward", "update")


class Step:
    """One training step of a model, timed by phase: the item tower, the encoder and the loss
    forward (as ``MatryoshkaRecommender.training_step`` computes them), backward, clipping and AdamW."""

    def __init__(self, model: MatryoshkaRecommender, device: torch.device, precision: str = "fp32") -> None:
        self.model = model.to(device).train()
        # the model's own optimizer, or (a package without that method) AdamW as its model built it
        build = getattr(model, "optimizer", None)
        self.optimizer = build() if callable(build) else torch.optim.AdamW(model.parameters(), lr=model.hparams.lr)
        self.synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def mark(self, marks: list[float]) -> None:
        self.synchronize()
        marks.append(time.perf_counter())

    def loss(self, batch: dict[str, torch.Tensor], marks: list[float]):
        """The forward as ``training_step`` computes it (under bf16 autocast for ``bf16``), marking each part."""
        model = self.model
        with self.autocast():
            if getattr(model, "_slices", None) is not None or getattr(model, "item_heads", None) is not None:
                # slices or own item vectors: the encoders run inside the per-size loss (the encoder
                # phase holds both, the loss phase is empty); the averaged teacher's forward
                # (--model.distill_teacher average) counts in the tower phase
                teacher = model._averaged_teacher(batch) if getattr(model, "teacher_average", None) is not None else None
                step = model.step_inputs(batch, with_items=model._slices is None)
                self.mark(marks)
                valid = step.targets > 0
                if model._slices is not None:
                    loss = model._sliced_loss(step, valid, None, teacher)
                else:
                    loss = model._separate_items_loss(model.net.sequence_states(step.input_ids, step.items)[valid], step,
                                                      None, teacher)
                self.mark(marks)
            elif hasattr(model, "step_inputs"):  # the model's own split of its training_loss (issue 30 on)
                step = model.step_inputs(batch)
                self.mark(marks)
                states = model.net.sequence_states(step.input_ids, step.items)
                self.mark(marks)
                loss = model._loss(states[step.targets > 0], step, model.sizes, model.hparams.loss_weights)
            else:  # the same, as the model computed it before
                items = model.net.item_matrix()
                self.mark(marks)
                states = model.net.sequence_states(batch["input_ids"], items)
                self.mark(marks)
                targets, candidates = batch["target_ids"], items
                if model._train_rows is not None:
                    candidates, targets = items[model._train_rows], model._train_row_of[targets]
                valid = targets > 0
                loss = model._loss(states[valid], candidates, targets[valid], model.sizes, model.hparams.loss_weights)
        self.mark(marks)
        return loss

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Runs the step; returns the seconds of each of ``PHASES``."""
        marks: list[float] = []
        self.mark(marks)
        self.optimizer.zero_grad(set_to_none=True)
        self.loss(batch, marks).total.backward()
        self.mark(marks)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.optimizer.step()
        if getattr(self.model, "teacher_average", None) is not None:  # the averaged teacher follows the step
            self.model.teacher_average.update(self.model)
        self.mark(marks)
        return {phase: b - a for phase, a, b in zip(PHASES, marks, marks[1:])}

    def initial_loss(self, batch: dict[str, torch.Tensor]) -> float:
        """The total loss of ``batch`` with the current weights and no dropout, nothing updated."""
        self.model.eval()
        with torch.no_grad():
            loss = float(self.loss(batch, []).total)
        self.model.train()
        return loss

    def flops(self, batch: dict[str, torch.Tensor]) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            self(batch)
        return int(counter.get_total_flops())


def epoch_order(module: SequenceDataModule) -> list[list[int]]:
    """Epoch 0's batches (window indices) as the module's train loader hands them out."""
    loader = module.train_dataloader()
    loader.batch_sampler.sampler.set_epoch(0)
    return list(loader.batch_sampler)


def bench_encoder(encoder: str, modules: dict, samples: dict, epoch_batches: int, model_settings: dict, max_len: int,
                  device: torch.device, precision: str) -> dict:
    """The batchings of one encoder on one dataset (``modules``' keys), taking turns step by step."""
    BATCHINGS = tuple(modules)
    torch.manual_seed(0)
    any_module = next(iter(modules.values()))
    model = MatryoshkaRecommender(
        item_features=any_module.item_features, cold_start_items=any_module.cold_start_items,
        item_counts=any_module.item_counts, encoder=encoder, max_len=max_len, **model_settings
    )
    step = Step(model, device, precision)
    batches = {b: [{k: v.to(device) for k, v in modules[b].train_windows.__getitems__(i).items()} for i in samples[b]]
               for b in BATCHINGS}
    rate = matmul_gflops(device=device, dtype=rate_dtype(precision))
    first = batches[BATCHINGS[0]][0]
    torch.manual_seed(1)  # the sampled loss draws its negatives: the same ones in every arm
    initial_loss = step.initial_loss(first)
    step(first)  # warm-up
    times: dict[str, list[float]] = {b: [] for b in BATCHINGS}
    phases: dict[str, dict[str, float]] = {b: dict.fromkeys(PHASES, 0.0) for b in BATCHINGS}
    for k in range(len(samples[BATCHINGS[0]])):
        for b in BATCHINGS:
            start = time.perf_counter()
            split = step(batches[b][k])
            times[b].append(time.perf_counter() - start)
            for phase, seconds in split.items():
                phases[b][phase] += seconds
    result: dict = {"matmul_gflops": rate, "parameters": sum(p.numel() for p in model.parameters()), "initial_loss": initial_loss,
                    # what the model took for the options a config may leave to the recipe (recsys.model_options.recipe_of)
                    "recipe": {k: model.hparams.get(k) for k in ("nesting", "prefix_gradient", "distill")}}
    for b in BATCHINGS:
        flops = [step.flops(batch) for batch in batches[b]]
        real = [int((batch["input_ids"] > 0).sum()) for batch in batches[b]]
        encoded = [batch["input_ids"].numel() for batch in batches[b]]
        mean = statistics.fmean(times[b])
        result[b] = {
            "step_s": times[b],
            "median_step_s": statistics.median(times[b]),
            "mean_step_s": mean,
            "widths": [int(batch["input_ids"].shape[1]) for batch in batches[b]],
            "real_positions": real,
            "encoded_positions": encoded,
            "flops": flops,
            "real_positions_per_s": sum(real) / sum(times[b]),
            "floor_fraction": (sum(flops) / (rate * 1e9)) / sum(times[b]),
            "epoch_s_extrapolated": mean * epoch_batches,
            "phase_shares": {phase: t / sum(times[b]) for phase, t in phases[b].items()},
        }
    if len(BATCHINGS) == 2:
        result["epoch_speedup"] = result["padded"]["mean_step_s"] / result["length"]["mean_step_s"]
    return result


def parse_data(values: list[str], parser: argparse.ArgumentParser) -> dict[str, Path]:
    data = {}
    for value in values:
        name, eq, directory = value.partition("=")
        if not eq or not name or not directory:
            parser.error(f"--data: expected NAME=DIR, got {value!r}")
        if not (ROOT / "configs" / f"{name}.yaml").is_file():
            parser.error(f"--data {value}: no configs/{name}.yaml to read the dataset's settings from")
        if not Path(directory).is_dir():
            parser.error(f"--data {value}: no such directory (prepare it with `make data/{name}`)")
        data[name] = Path(directory)
    return data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, metavar="NAME=DIR", help="prepared datasets; NAME picks configs/NAME.yaml")
    parser.add_argument("--encoders", nargs="+", choices=ENCODERS, default=list(ENCODERS))
    parser.add_argument("--steps", type=int, default=4, help="timed batches per batching, dataset and encoder")
    parser.add_argument("--steps-for", nargs="*", default=[], metavar="NAME:ENCODER=STEPS", help="fewer steps where a step is slow")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--max-len", type=int, default=None, help="override the configs' data.max_len (a quick look)")
    parser.add_argument("--precision", choices=("auto", *PRECISIONS), default="auto",
                        help="fp32, tf32 (float32 products on TF32 tensor cores), bf16 (autocast), or auto: what "
                             "`python -m recsys.train` of the measured package picks on this machine; see above")
    parser.add_argument("--batchings", nargs="+", choices=BATCHINGS, default=list(BATCHINGS))
    parser.add_argument("--loss", choices=("config", "full", "sampled"), default="config",
                        help="the training loss: the config's (default), or the full or sampled softmax for every dataset")
    parser.add_argument("--baseline", metavar="REV", default=None,
                        help="also time the package of git commit REV, as it trains (its default precision), "
                             "arm by arm beside this checkout's; writes both and their ratios (see above)")
    parser.add_argument("--package", default=str(ROOT), help=argparse.SUPPRESS)  # the recsys measured (read at import)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="model settings beyond the config's (VALUE as JSON), e.g. nesting='\"slices\"' prefix_gradient=0")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_step.json")
    args = parser.parse_args(argv)
    data = parse_data(args.data, parser)
    if args.baseline:
        return compare(args, data)
    if reuse_freed_memory is not None:
        reuse_freed_memory()
    if args.precision == "auto":
        args.precision = "bf16" if args.device == "cpu" and default_precision and default_precision() == "bf16-mixed" else "fp32"
    if args.steps < 1 or args.threads < 1 or (args.max_len is not None and args.max_len < 1):
        parser.error(f"--steps, --threads and --max-len must be positive, got {args.steps}, {args.threads} and {args.max_len}")
    steps_for = {}
    for value in args.steps_for:
        key, eq, n = value.partition("=")
        if not eq or not n.isdigit() or int(n) < 1 or key.partition(":")[0] not in data or key.partition(":")[2] not in ENCODERS:
            parser.error(f"--steps-for: expected NAME:ENCODER=STEPS with NAME one of --data and a positive STEPS, got {value!r}")
        steps_for[key] = int(n)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here")
    device = torch.device(args.device)
    use_precision(args.precision)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("lightning").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    rate_start = matmul_gflops(device=device, dtype=rate_dtype(args.precision))
    logger.info("load %s, %s matmul on %s %.1f GFLOP/s", load_start, args.precision, args.device, rate_start)

    datasets = {}
    for name, directory in data.items():
        model_settings, data_settings = dataset_settings(name)
        if args.loss != "config":
            model_settings["loss"] = args.loss
        for value in args.model_set:
            key, eq, text = value.partition("=")
            try:
                model_settings[key] = json.loads(text)
            except json.JSONDecodeError:
                parser.error(f"--model-set {value!r}: VALUE must be JSON (a string in double quotes)")
        if args.max_len:
            data_settings["max_len"] = args.max_len
        modules, orders, epoch = {}, {}, {}
        for b in args.batchings:
            modules[b] = SequenceDataModule(data_dir=str(directory), seed=args.seed, length_batching=b == "length", **data_settings)
            orders[b] = epoch_order(modules[b])
            epoch[b] = {"batches": len(orders[b]), "real_fraction": real_fraction(modules[b].train_windows.lengths, orders[b])}
        windows = next(iter(modules.values())).train_windows
        row = {
            "config": f"configs/{name}.yaml",
            "model": model_settings,
            **data_settings,
            "windows": len(windows),
            "median_window_length": float(np.median(windows.lengths)),
            "epoch": epoch,
            "encoders": {},
        }
        logger.info("%s: %s windows, real fraction %s", name, len(windows),
                    ", ".join(f"{b} {e['real_fraction']:.3f}" for b, e in epoch.items()))
        for encoder in args.encoders:
            n = steps_for.get(f"{name}:{encoder}", args.steps)
            samples = {}
            for b in args.batchings:
                widths = np.array([int(windows.lengths[np.asarray(i)].max()) for i in orders[b]])
                samples[b] = [orders[b][i] for i in spread_sample(widths, n)]
            started = time.perf_counter()
            result = bench_encoder(encoder, modules, samples, len(next(iter(orders.values()))), model_settings,
                                   data_settings["max_len"], device, args.precision)
            result["steps"] = n
            result["load_average_before"] = os.getloadavg()
            row["encoders"][encoder] = result
            logger.info("%s %s (%d steps, %.0f s): %s", name, encoder, n, time.perf_counter() - started, "; ".join(
                f"{b} {result[b]['mean_step_s']:.2f} s/step, floor {100 * result[b]['floor_fraction']:.1f}%, "
                f"real positions/s {result[b]['real_positions_per_s']:.0f}" for b in args.batchings))
        datasets[name] = row

    report = {
        "machine": {
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "platform": platform.platform(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
        "device": args.device,
        "precision": args.precision,
        "package": "this checkout" if Path(args.package).resolve() == ROOT else "an earlier commit's (--baseline)",
        "command": "python bench/train_step.py " + " ".join(
            [f"--data {' '.join(f'{k}=data/{k}' for k in data)}", f"--steps {args.steps}"]
            + ([f"--steps-for {' '.join(args.steps_for)}"] if args.steps_for else [])
            + ([f"--encoders {' '.join(args.encoders)}"] if args.encoders != list(ENCODERS) else [])
            + ([f"--device {args.device}"] if args.device != "cpu" else []) + [f"--precision {args.precision}"]
            + ([f"--batchings {' '.join(args.batchings)}"] if args.batchings != list(BATCHINGS) else [])
            + ([f"--max-len {args.max_len}"] if args.max_len else [])
            + ([f"--loss {args.loss}"] if args.loss != "config" else [])
            + ([f"--model-set {' '.join(shlex.quote(v) for v in args.model_set)}"] if args.model_set else [])
        ),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "matmul_gflops_start": rate_start,
        "matmul_gflops_end": matmul_gflops(device=device, dtype=rate_dtype(args.precision)),
        "sampling": "per dataset, encoder and batching: the timed batches are spread over epoch 0's batch widths "
        "(one per equal slice of the batches sorted by width, nearest the slice's mean width); epoch times are the mean step time times the epoch's batch count (extrapolated, not timed whole); "
        "real fractions are over the whole epoch",
        "step": "the training step of MatryoshkaRecommender (item tower, encoder, loss) + backward + gradient clipping + AdamW",
        "phases": "phase_shares: each phase's share of the step time: item tower forward, encoder forward, loss forward, "
        "backward (all of it), gradient clipping + AdamW",
        "datasets": datasets,
    }
    # On a shared machine the rate measured before one encoder's steps may be depressed by load;
    # the highest rate of the run gives the conservative floor (the smallest fraction).
    rates = [report["matmul_gflops_start"], report["matmul_gflops_end"]]
    rates += [r["matmul_gflops"] for data in datasets.values() for r in data["encoders"].values()]
    report["matmul_gflops_highest"] = max(rates)
    for data in datasets.values():
        for r in data["encoders"].values():
            for b in args.batchings:
                r[b]["floor_fraction_at_highest_rate"] = sum(r[b]["flops"]) / (max(rates) * 1e9) / sum(r[b]["step_s"])
    write_json_atomically(args.out, report, indent=2)
    print(f"wrote {args.out}")


def compare(args: argparse.Namespace, data: dict[str, Path]) -> None:
    """``--baseline REV``: for each dataset and encoder, the package of commit ``REV`` and this
    checkout's, each in a process of its own (this script with ``--package``), one after the other,
    each as it trains by default (``--precision auto``: the baseline's float32, this checkout's
    bf16-mixed where the CPU has it, and its process settings, recsys/runtime.py); then the ratios
    of real positions per second, this checkout's over the baseline's."""
    results: dict = {}
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        rev = unpack_commit(args.baseline, ["recsys"], Path(tmp) / "baseline")
        arms = {"baseline": str(Path(tmp) / "baseline"), "current": str(ROOT)}
        for name, directory in data.items():
            for encoder in args.encoders:
                for arm, package in arms.items():
                    out = Path(tmp) / f"{name}-{encoder}-{arm}.json"
                    command = [sys.executable, __file__, "--data", f"{name}={directory}", "--encoders", encoder,
                               "--steps", str(args.steps), "--threads", str(args.threads), "--batchings", *args.batchings,
                               "--seed", str(args.seed), "--loss", args.loss, f"--package={package}", "--out", str(out)]
                    mine = [v for v in args.steps_for if v.partition("=")[0] == f"{name}:{encoder}"]
                    command += ["--steps-for", *mine] if mine else []
                    command += ["--max-len", str(args.max_len)] if args.max_len else []
                    logger.info("%s %s, %s (%s)", name, encoder, arm, rev if arm == "baseline" else "this checkout")
                    subprocess.run(command, check=True)
                    results.setdefault(name, {}).setdefault(encoder, {})[arm] = json.loads(out.read_text())
    datasets = {}
    for name, encoders in results.items():
        row = {k: v for k, v in encoders[args.encoders[0]]["current"]["datasets"][name].items() if k != "encoders"}
        row["encoders"] = {}
        for encoder, arm_reports in encoders.items():
            entry = {}
            for arm, report in arm_reports.items():
                entry[arm] = {"precision": report["precision"], "load_average_start": report["load_average_start"],
                              "matmul_gflops_highest": report["matmul_gflops_highest"],
                              **report["datasets"][name]["encoders"][encoder]}
            entry["speedup"] = {b: entry["current"][b]["real_positions_per_s"] / entry["baseline"][b]["real_positions_per_s"]
                                for b in args.batchings}
            row["encoders"][encoder] = entry
            logger.info("%s %s: %s", name, encoder, ", ".join(f"{b} {v:.2f}x" for b, v in entry["speedup"].items()))
        datasets[name] = row
    m = next(iter(next(iter(results.values())).values()))["current"]["machine"]
    report = {
        "machine": m,
        "baseline": rev,
        "command": "python bench/train_step.py " + " ".join(
            [f"--data {' '.join(f'{k}=data/{k}' for k in data)}", f"--encoders {' '.join(args.encoders)}",
             f"--steps {args.steps}", f"--batchings {' '.join(args.batchings)}", f"--baseline {args.baseline}"]
            + ([f"--steps-for {' '.join(args.steps_for)}"] if args.steps_for else [])
            + ([f"--max-len {args.max_len}"] if args.max_len else [])
            + ([f"--loss {args.loss}"] if args.loss != "config" else [])),
        "arms": "baseline: the recsys package of commit `baseline` as it trains by default (float32); current: this "
                "checkout's, as it trains by default (its precision, recsys/runtime.py's process settings); each in a "
                "process of its own, the baseline first, on the same batches",
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "floor": "each arm's floor_fraction is at the product rate of its own precision measured before its steps "
                 "(floor_fraction_at_highest_rate: the highest rate its process measured)",
        "datasets": datasets,
    }
    write_json_atomically(args.out, report, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
