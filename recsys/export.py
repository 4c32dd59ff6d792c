"""``python -m recsys.export``: cut a trained model to chosen sizes and write one directory each.

    python -m recsys.export --checkpoint CKPT --dims 64,128 --out DIR
    python -m recsys.export --run-id RUN_ID --dims 64 --out DIR          # best checkpoint of an MLflow run
    python -m recsys.export --model-uri models:/NAME-d64@champion --out DIR   # a registered size
    python -m recsys.export --checkpoint CKPT --depth 2 --width 128 --dims 32 --out DIR   # one elastic sub-model

``DIR/d<size>/`` gets the encoder cut to that size and the item matrix ``Z[:, :size]`` as
safetensors, the item vocabulary, the retriever's files (none for the default exact search; a
faiss index with ``--index flat|ivf_flat|hnsw|ivf_pq``) and a manifest with checksums (format in
``recsys/export_dir.py``). Each directory is written under a temporary name and swapped in when
complete (``recsys.atomic``), so an interrupted export never leaves a directory that looks finished,
a re-export keeps the previous one whole and loadable until the new one is in place, and exports
racing into one place each succeed (the directory is the last one's, whole). ``--out`` is checked
first (a file, or a place this process cannot write into, is one line before anything is read), and
a disk that fills up is one line too; the previous export stays whole. A checkpoint whose weights or
item features hold NaN or infinite values is refused before anything is written, and what is written
must pass the loader's checks before it is swapped in.
"""

from __future__ import annotations

import sys

from jsonargparse import ArgumentParser

from recsys.console import help_asked


def export_parser(doc: str) -> ArgumentParser:
    parser = ArgumentParser(prog="python -m recsys.export", description=doc.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=str | None, default=None, help="a checkpoint written by recsys.train")
    parser.add_argument("--run-id", type=str | None, default=None, help="an MLflow run of recsys.train (its best checkpoint)")
    parser.add_argument("--model-uri", type=str | None, default=None, help="a logged size, e.g. models:/NAME-d64@champion")
    parser.add_argument("--dims", type=str | None, default=None, help="comma-separated sizes, e.g. 64,128 (default: all)")
    parser.add_argument("--depth", type=int | None, default=None,
                        help="elastic sub-model: keep encoder blocks 1..DEPTH (default: all)")
    parser.add_argument("--width", type=int | None, default=None,
                        help="elastic sub-model: encoder width, at least the size (default: the size)")
    parser.add_argument("--out", type=str, required=True,
                        help="output directory; each size goes to OUT/d<size> (with --depth/--width OUT/L<d>_w<w>_d<s>)")
    parser.add_argument("--index", type=str, default="exact",
                        help="exact (torch search, no index file) or a faiss index: flat, ivf_flat, hnsw or ivf_pq")
    parser.add_argument("--item-dtype", type=str, default="float32", help="float32 or float16 item matrix")
    parser.add_argument("--funnel-prefix", type=int | None, default=None,
                        help="serve with a funnel: shortlist with this many dimensions, re-rank at the full size; "
                             "with own item vectors or sliced nesting, a smaller size whose own export shortlists")
    parser.add_argument("--funnel-shortlist", type=int, default=1000, help="items shortlisted by the funnel")
    return parser


if __name__ == "__main__" and help_asked(sys.argv[1:]):  # answered before torch is imported (seconds)
    export_parser(__doc__).parse_args()

# the imports below take seconds (torch), so the help comes first
import json
import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from safetensors.torch import save_file

from recsys.atomic import AtomicDirectory, check_writable, give_default_mode, reported_write_failures
from recsys.errors import exit_code_of
from recsys.nn.nested import cut_sizes, cut_to_size, nested_parameter_count
from recsys.export_dir import (
    FORMAT_VERSION,
    MANIFEST,
    NESTED_EXPORTS,
    OUTPUT_ITEMS,
    OWN_FUNNEL,
    SHORTLIST_EXPORT,
    ExportError,
    fetch_export,
    read_items,
    read_manifest,
    read_weights,
    recorded_settings,
    sha256_of,
)

__all__ = ["export_each_size", "export_sizes", "export_size", "export_triples", "load_trained", "main", "own_network"]

log = logging.getLogger(__name__)


def load_trained(checkpoint: str | Path):
    """The trained Lightning model and its catalogue (original ids, popularity, data stats)."""
    from recsys.checkpoint import CheckpointError
    from recsys.model import MatryoshkaRecommender

    path = Path(checkpoint)
    if not path.is_file():
        raise ExportError(f"{path}: no such checkpoint file")
    try:
        model = MatryoshkaRecommender.from_checkpoint(path)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    except (RuntimeError, KeyError, EOFError) as exc:
        raise ExportError(f"{path}: not a checkpoint of this project ({str(exc).splitlines()[0]})") from None
    catalogue = model.catalogue
    if catalogue is None:
        raise ExportError(f"{path}: the checkpoint has no item catalogue (was it written by recsys.train?)")
    return model.eval(), catalogue


@torch.no_grad()
def export_size(
    model,
    catalogue: dict[str, Any],
    size: int,
    out: str | Path,
    source: dict[str, Any],
    index: str = "exact",
    item_dtype: str = "float32",
    funnel_prefix: int | None = None,
    funnel_shortlist: int = 1000,
    width: int | None = None,
    depth: int | None = None,
    shortlist_model=None,
) -> Path:
    """Write ``out`` for the model cut to ``size`` and return it.

    ``width`` and ``depth`` (elastic sub-models, ``recsys/nn/grid.py``; defaults: ``size`` and the
    full depth) cut the encoder to that width and its first ``depth`` blocks; with ``size < width``
    the vector head of that depth and width, which the model must have trained, maps its state
    to ``size`` dims. Either one given writes ``width`` and ``depth`` into the manifest.

    ``index`` is ``"exact"`` (the default: exact torch search, no index file; its speed against a
    faiss flat index, per device, is in ``bench/results/candidates.json``) or a faiss index kind. With
    ``funnel_prefix`` the index covers only the first ``funnel_prefix`` dimensions and
    serving runs a funnel search: shortlist ``funnel_shortlist`` items with it, then re-rank them
    exactly at ``size`` (docs/method.md §6). Where ``size`` or the size ``funnel_prefix`` serves with
    a network of its own (its own item vectors, or ``nesting slices``), ``funnel_prefix`` must be
    one of the model's sizes below ``size``: the export then holds that size's complete export
    (with ``index``) in ``shortlist/``, whose own network shortlists (an own-network funnel), taken
    from ``shortlist_model`` where given (the prefix size's own best checkpoint, with a checkpoint
    per size), else from ``model``.
    """
    if size not in model.sizes:
        raise ExportError(f"size {size} is not one of the model's sizes {list(model.sizes)}")
    elastic = width is not None or depth is not None
    width = size if width is None else width
    full_depth = model.hparams.n_blocks
    depth = full_depth if depth is None else depth
    if width not in model.sizes or size > width:
        raise ExportError(f"width {width} must be one of the model's sizes {list(model.sizes)}, and at least the size {size}")
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= full_depth:
        raise ExportError(f"depth {depth} must lie in 1..{full_depth} (the model's blocks)")
    if width not in cut_sizes(model.net):
        raise ExportError(
            f"the {model.hparams.encoder} encoder is not nested: it can be exported at its full size "
            f"{model.sizes[-1]} only, not {width}"
        )
    output = model.own_item_vectors(size)
    own = own_network(model, size)
    if own is not None and elastic:
        raise ExportError(f"size {size} {own}: export it without width or depth")
    own_funnel = funnel_prefix is not None and _is_own_funnel(model, size, funnel_prefix)
    if funnel_prefix is not None and not 0 < funnel_prefix < size:
        raise ExportError(f"the funnel prefix must be between 1 and the size {size} (exclusive), got {funnel_prefix}")
    if item_dtype not in ("float32", "float16"):
        raise ExportError(f"item_dtype must be float32 or float16, got {item_dtype!r}")
    from recsys.nn.item_tower import FixedItemMatrix
    from recsys.nn.recommender import SequentialRecommender
    from recsys.retrieval import build_retriever

    sliced = model.hparams.get("nesting", "blocks") == "slices"
    # with slices the size's own item tower computes its matrix; with blocks it is the full one's prefix
    net = cut_to_size(model.net, size) if sliced else model.net
    full = SequentialRecommender(FixedItemMatrix(net.item_matrix(), net.sizes), net.encoder, grid=net.grid)
    if hasattr(net, "heads"):
        full.heads = net.heads
    try:
        small = cut_to_size(full, size, width=width, depth=depth)
    except ValueError as exc:  # no head trained for this depth and width
        raise ExportError(f"depth {depth}, width {width}, size {size}: {exc}") from None
    state = {k: v.contiguous() for k, v in small.state_dict().items()}
    if output is not None:  # what this size's user vectors are scored against: its own item vectors
        state[OUTPUT_ITEMS] = output.contiguous()
    if item_dtype == "float16":
        state = {k: v.half() if k in ("items.matrix", OUTPUT_ITEMS) else v for k, v in state.items()}

    vectors = (small.items.matrix[:, :size] if output is None else output)[1:].float().numpy()  # (with output_bias: s + 1)
    if own_funnel:  # no retriever at this size: the shortlist export's searches, this size re-ranks
        retriever, entry = None, _own_funnel_entry(size, funnel_prefix, funnel_shortlist, len(vectors))
    else:
        settings = _retriever_settings(index, size, len(vectors), funnel_prefix, funnel_shortlist)
        try:
            retriever = build_retriever(vectors, settings)  # before anything is written
        except ValueError as exc:  # settings that do not fit this model (e.g. too few items for ivf_pq)
            raise ExportError(f"size {size}: cannot build the retriever {settings}: {exc}") from None
        entry = retriever.to_dict()

    item_ids = catalogue["item_ids"]
    manifest = {
        "format_version": FORMAT_VERSION,
        "size": size,
        "sizes": list(small.sizes),
        "model_sizes": list(model.sizes),
        "encoder": model.hparams.encoder,
        "encoder_options": {**model.encoder_options(), "n_blocks": depth},
        **({"width": width, "depth": depth} if elastic else {}),
        "max_len": model.hparams.max_len,
        "num_parameters": nested_parameter_count(small.encoder) + sum(
            p.numel() for p in getattr(small, "heads", torch.nn.Module()).parameters()),
        "num_items": len(item_ids),
        "separate_item_vectors": output is not None,
        # written only when set: an export without it reads as before (older servers)
        **({"output_bias": True} if model.output_bias is not None else {}),  # (every size has own vectors then)
        "item_dtype": item_dtype,
        "retriever": entry,
        # the same settings under the keys that readers from before "retriever" use
        "index": entry.get("index"),
        "funnel": {key: v for key, v in entry.items() if key != "kind"} if entry["kind"] == "funnel" else None,
        "source": source,
        "data_stats": catalogue.get("stats", {}),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

    final = Path(out)
    # written under a temporary name beside it, then swapped in whole (the old export stays loadable until then)
    directory = AtomicDirectory(final)
    tmp = directory.path
    try:
        # the weights record the entries that decide what they compute: a manifest edited later is refused
        save_file(state, tmp / "model.safetensors", metadata=recorded_settings(manifest))
        give_default_mode(tmp / "model.safetensors")  # safetensors writes 0600; the other files follow the umask
        pl.DataFrame(
            {
                "row": np.arange(1, len(item_ids) + 1, dtype=np.int64),
                "item_id": item_ids,
                "popularity": np.asarray(catalogue["popularity"], dtype=np.int64),
            }
        ).write_parquet(tmp / "items.parquet")
        if retriever is not None:
            retriever.save(tmp)
        else:  # the smaller size's complete export, verified as it is written
            export_size(shortlist_model or model, catalogue, funnel_prefix, tmp / SHORTLIST_EXPORT, source, index=index,
                        item_dtype=item_dtype)
            manifest[NESTED_EXPORTS] = {SHORTLIST_EXPORT: sha256_of(tmp / SHORTLIST_EXPORT / MANIFEST)}
        manifest["checksums"] = {p.name: sha256_of(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        _check_written(tmp)
        path = directory.commit()
    except BaseException:
        directory.abort()
        raise
    log.info("exported size %d, width %d, depth %d (%d encoder parameters) to %s", size, width, depth,
             manifest["num_parameters"], path)
    return path


def own_network(model, size: int) -> str | None:
    """Why ``size`` serves with a network of its own rather than the prefix of a larger size's
    vectors (its own item vectors, or sliced weights); None when it does not."""
    if model.hparams.get("nesting", "blocks") == "slices":
        return "is a network of its own (--model.nesting slices)"
    if model.own_item_tower(size) is not None:
        return "scores items with its own item vectors (--model.separate_item_vectors)"
    return None


def _is_own_funnel(model, size: int, prefix: int) -> bool:
    """Whether the funnel of ``size`` shortlists with size ``prefix``'s own network, as that size
    serves alone: where either size serves with a network of its own, and then ``prefix`` must be
    one of the model's sizes below ``size``. Otherwise it shortlists with the prefix of ``size``'s vectors."""
    reasons = [(s, why) for s in (size, prefix) if (why := own_network(model, s)) is not None]
    if not reasons:
        return False
    smaller = [s for s in model.sizes if s < size]
    if prefix not in smaller:
        owner, why = reasons[0]
        raise ExportError(
            f"the funnel prefix {prefix} must be one of the model's sizes below {size} ({smaller or 'none'}): "
            f"size {owner} {why}, so the funnel shortlists with a smaller size's own network"
        )
    return True


def _own_funnel_entry(size: int, prefix: int, shortlist: int, num_items: int) -> dict[str, Any]:
    """The manifest entry of an own-network funnel: size ``prefix``'s export in ``SHORTLIST_EXPORT``
    shortlists ``shortlist`` items (at most all), which ``size`` re-ranks."""
    from recsys.retrieval.checks import check_int

    try:
        shortlist = check_int("shortlist", shortlist)
    except ValueError as exc:
        raise ExportError(f"size {size}: cannot build the funnel: {exc}") from None
    return {"kind": OWN_FUNNEL, "shortlist_export": SHORTLIST_EXPORT, "shortlist": min(shortlist, num_items),
            "prefix_size": prefix}


def _check_written(directory: Path) -> None:
    """What was written passes the loader's checks of the manifest, the weights and the item table."""
    manifest = read_manifest(directory)
    read_weights(directory, manifest)
    read_items(directory, manifest["num_items"])


def _retriever_settings(
    index: str, size: int, num_items: int, funnel_prefix: int | None, funnel_shortlist: int
) -> dict[str, Any]:
    """The manifest entry to build: exact search or a faiss index of kind ``index`` at ``size``, or a
    funnel shortlisting ``funnel_shortlist`` items (at most all) with one over the first ``funnel_prefix`` dims."""
    if funnel_prefix is None:
        return {"kind": "exact"} if index == "exact" else {"kind": "faiss", "index": {"kind": index}}
    shortlist = min(funnel_shortlist, num_items)
    funnel = {"kind": "funnel", "prefix": funnel_prefix, "shortlist": shortlist, "rerank_dims": [size]}
    if index == "exact":
        return {**funnel, "prefix_retriever": {"kind": "exact"}}
    return {**funnel, "index": {"kind": index}}


def export_sizes(
    checkpoint: str | Path, dims: list[int], out: str | Path, source: dict[str, Any] | None = None,
    width: int | None = None, depth: int | None = None, **options: Any,
) -> list[Path]:
    """Export every size in ``dims`` from a checkpoint into ``out/d<size>``; with ``width`` or
    ``depth`` (one size) into ``out/L<depth>_w<width>_d<size>``. ``options`` are
    :func:`export_size`'s."""
    if width is None and depth is None:
        return _export(checkpoint, [(d, None, None) for d in dims], out, source, options)
    if len(dims) != 1:
        raise ExportError(f"--width and --depth choose one sub-model: give one size in --dims, got {dims}")
    return _export(checkpoint, [(dims[0], width, depth)], out, source, options)


def export_triples(checkpoint: str | Path, triples: list, out: str | Path, source: dict[str, Any] | None = None,
                   **options: Any) -> list[Path]:
    """Export each trained (depth, width, size) triple of an elastic checkpoint into
    ``out/L<depth>_w<width>_d<size>``, from one reading of the checkpoint."""
    return _export(checkpoint, [(t.size, t.width, t.depth) for t in triples], out, source, options)


def _export(checkpoint: str | Path, jobs: list[tuple[int, int | None, int | None]], out: str | Path,
            source: dict[str, Any] | None, options: dict[str, Any]) -> list[Path]:
    """Each ``(size, width, depth)`` of ``jobs`` exported from one reading of ``checkpoint``: into
    ``out/d<size>``, or with a width or depth into ``out/<its triple's label>``."""
    from recsys.nn.grid import Triple
    from recsys.retrieval import IndexSpec

    if options.get("index", "exact") != "exact":
        try:
            IndexSpec(kind=options["index"])  # an unknown kind fails here, before anything is read or written
        except ValueError as exc:
            raise ExportError(str(exc)) from None
    check_writable(out)
    model, catalogue = load_trained(checkpoint)
    bad = [size for size, _, _ in jobs if size not in model.sizes]
    if bad:
        raise ExportError(f"size(s) {bad} are not sizes of this model; valid sizes: {list(model.sizes)}")
    _check_finite(checkpoint, model)
    source = source or {"checkpoint": Path(checkpoint).name}

    def directory(size: int, width: int | None, depth: int | None) -> Path:
        if width is None and depth is None:
            return Path(out) / f"d{size}"
        return Path(out) / Triple(model.hparams.n_blocks if depth is None else depth, size if width is None else width, size).label

    with reported_write_failures(out, option=""):  # a full disk: one line; an old export stays whole
        return [export_size(model, catalogue, size, directory(size, width, depth), source, width=width, depth=depth,
                            **options) for size, width, depth in jobs]


def export_each_size(checkpoint_of: dict[int, str | Path], out: str | Path, source: dict[str, Any] | None = None,
                     dims: list[int] | None = None, **options: Any) -> list[Path]:
    """:func:`export_sizes` with each size from its own checkpoint (``--model.monitor_size each``
    keeps one per size): ``checkpoint_of`` maps sizes to their checkpoints, ``dims`` picks the sizes
    to export (default: all of them). Sizes that share a checkpoint are exported from one reading
    of it, and an own-network funnel shortlists with its prefix size's own checkpoint. Returns the
    export directories in the order of ``dims``."""
    dims = list(checkpoint_of) if dims is None else dims
    by_checkpoint: dict[str, list[int]] = {}
    for size in dims:
        by_checkpoint.setdefault(str(checkpoint_of[size]), []).append(size)
    shortlist = checkpoint_of.get(options.get("funnel_prefix"))
    shortlist_model = None
    if shortlist is not None and any(str(shortlist) != c for c in by_checkpoint):  # read once, for every group
        shortlist_model = load_trained(shortlist)[0]
        _check_finite(shortlist, shortlist_model)
    written = {}
    for checkpoint, group in by_checkpoint.items():
        own = {} if shortlist_model is None or str(shortlist) == checkpoint else {"shortlist_model": shortlist_model}
        written.update(zip(group, export_sizes(checkpoint, group, out, source, **options, **own)))
    return [written[size] for size in dims]


@torch.no_grad()
def _check_finite(checkpoint: str | Path, model) -> None:
    """Weights, item features and the item matrix computed from them hold finite values only: an
    export of anything else would be refused by ``serving.load``, so nothing is written."""
    tensors = model.state_dict()
    bad = [name for name, tensor in tensors.items() if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if not bad and not bool(torch.isfinite(model.net.item_matrix()).all()):
        bad = ["the item matrix computed from its item features"]
    if bad:
        more = f" (and {len(bad) - 1} more tensor(s))" if len(bad) > 1 else ""
        raise ExportError(f"{checkpoint}: {bad[0]} holds NaN or infinite values{more}; an export of it could not be "
                          "loaded, so none was written")


SIZE_CHECKPOINT = re.compile(r"-d(\d+)\.ckpt$")  # a size's own best checkpoint (best-d64.ckpt)


def _checkpoints_of_run(run_id: str, workdir: Path) -> tuple[Path, dict[int, Path]]:
    """The run's checkpoint and, where it kept one per size (``--model.monitor_size each``), each
    size's: ``(the best, or the largest size's; {size: its own})``."""
    import mlflow

    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints", dst_path=str(workdir))
    except Exception as exc:  # mlflow raises several types for unknown runs and paths
        raise ExportError(f"MLflow run {run_id}: no checkpoint artifact ({str(exc).splitlines()[0]})") from None
    found = sorted(Path(local).glob("*.ckpt"))
    if not found:
        raise ExportError(f"MLflow run {run_id}: the checkpoints artifact holds no .ckpt file")
    own = {int(m.group(1)): path for path in found if (m := SIZE_CHECKPOINT.search(path.name))}
    shared = [path for path in found if path not in own.values()]
    return (shared[0] if shared else own[max(own)]), own


def _default_dims(checkpoint, args) -> list[int]:
    """Every size, or with ``--width``/``--depth`` the one size of the full model (its width)."""
    sizes = load_trained(checkpoint)[0].sizes
    return [sizes[-1] if args.width is None else args.width] if (args.width or args.depth) else list(sizes)


def main(argv: list[str] | None = None) -> int:
    args = export_parser(__doc__).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader reports every CPU variant it tries
    return exit_code_of(lambda: _run(args))


def _run(args) -> None:
    chosen = [bool(args.checkpoint), bool(args.run_id), bool(args.model_uri)]
    if sum(chosen) != 1:
        raise ExportError("give exactly one of --checkpoint, --run-id or --model-uri")
    try:
        dims = [int(d) for d in args.dims.split(",")] if args.dims else None
    except ValueError:
        raise ExportError(f"--dims must be comma-separated integers, got {args.dims!r}") from None
    out = Path(args.out)
    check_writable(out)  # before anything is downloaded or read
    options = {"index": args.index, "item_dtype": args.item_dtype,
               "funnel_prefix": args.funnel_prefix, "funnel_shortlist": args.funnel_shortlist,
               "width": args.width, "depth": args.depth}
    if args.model_uri:
        paths = fetch_export(args.model_uri, dims, out)
    elif args.run_id:
        with tempfile.TemporaryDirectory() as work:
            ckpt, own = _checkpoints_of_run(args.run_id, Path(work))
            dims = dims or _default_dims(ckpt, args)
            source = {"mlflow_run_id": args.run_id}
            if own and args.width is None and args.depth is None:
                paths = export_each_size({**dict.fromkeys(dims, ckpt), **own}, out, source, dims=dims, **options)
            else:
                paths = export_sizes(ckpt, list(dims), out, source=source, **options)
    else:
        dims = dims or _default_dims(args.checkpoint, args)
        paths = export_sizes(args.checkpoint, list(dims), out, **options)
    for p in paths:
        print(p)


if __name__ == "__main__":
    sys.exit(main())
