"""``python -m recsys.data``: prepare a dataset directory, or write the synthetic log as files.

    python -m recsys.data prepare --interactions FILE [--items FILE] --out DIR [options]
    python -m recsys.data synthetic --out DIR [--num-users N ...]

Bad input ends with one line on stderr, naming the file and the column, row or value, and exit
status 2 (no traceback).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import typing
from typing import Literal

from jsonargparse import ArgumentParser

from recsys.data.errors import DataValidationError
from recsys.data.synthetic import SyntheticConfig, write_synthetic  # its fields are the synthetic command's options
from recsys.errors import exit_code_of

log = logging.getLogger("recsys.data")


def prepare_parser() -> ArgumentParser:
    p = ArgumentParser(description="Clean an interaction log, build vocabularies, features and the leave-one-out split.")
    p.add_argument("--interactions", type=str, required=True, help="interaction log: .csv, .tsv (read with quoting off) or .parquet")
    p.add_argument("--out", type=str, required=True, help="output directory (written to a temporary name, then renamed)")
    p.add_argument("--items", type=str, default=None, help="item table; its items stay in the catalogue even without interactions")
    p.add_argument("--user-col", type=str, default="user_id", help="user id column of the log")
    p.add_argument("--item-col", type=str, default="item_id", help="item id column of the log")
    p.add_argument("--time-col", type=typing.Optional[str], default="timestamp",
                   help="time column: timestamp, date/datetime, or an integer order such as seq; null = file row order")
    p.add_argument("--weight-col", type=typing.Optional[str], default=None, help="optional numeric column kept as 'weight'")
    p.add_argument("--items-id-col", type=typing.Optional[str], default=None, help="item id column of the item table (default: --item-col)")
    p.add_argument("--text-cols", type=str, nargs="+", default=None, help="item-table columns joined into one text per item and encoded")
    p.add_argument("--text-model", type=typing.Optional[str], default=None,
                   help="sentence-transformers name or local path (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--category-cols", type=str, nargs="+", default=None, help="multi-valued categorical item-table columns")
    p.add_argument("--category-sep", type=str, default="|", help="separator of the values in --category-cols")
    p.add_argument("--vectors", type=str, action="append", default=None, metavar="NAME=FILE",
                   help="precomputed item vectors (parquet: id + list column; npz: ids, vectors); repeatable")
    p.add_argument("--cold-items", type=bool, default=True,
                   help="keep item-table items without interactions as candidates; false = only interacted items (as published benchmarks)")
    p.add_argument("--min-count", type=int, default=5, help="k-core threshold for users and items (users need at least 3)")
    p.add_argument("--repeats", type=Literal["keep", "drop", "collapse"], default="drop",
                   help="repeated (user, item) events: keep all, drop all but the first, or collapse consecutive runs")
    p.add_argument("--cold-start-fraction", type=float, default=0.0,
                   help="hold this fraction of the interacted items out of training (their events kept only as test targets), "
                        "for the cold-start protocol; 0 = off")
    p.add_argument("--cold-start-seed", type=int, default=0, help="seed of the draw of the cold-start items")
    p.add_argument("--cache-dir", type=typing.Optional[str], default="data/.cache", help="text-vector cache (null = none)")
    p.add_argument("--overwrite", type=bool, default=False, help="replace an existing output directory")
    return p


def synthetic_parser() -> ArgumentParser:
    p = ArgumentParser(description="Write the synthetic log as interactions.parquet, items.parquet (tags) and vectors.parquet.")
    p.add_argument("--out", type=str, required=True, help="output directory")
    hints = typing.get_type_hints(SyntheticConfig)
    for f in dataclasses.fields(SyntheticConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=hints[f.name], default=f.default, dest=f.name)
    return p


def parse_vectors(values: list[str] | None) -> dict[str, str]:
    vectors: dict[str, str] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise DataValidationError("--vectors", f"expected NAME=FILE, got {value!r}")
        if name in vectors:
            raise DataValidationError("--vectors", f"the name {name!r} is given twice")
        vectors[name] = path
    return vectors


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m recsys.data", description=__doc__.splitlines()[0])
    commands = parser.add_subcommands(dest="command")
    commands.add_subcommand("prepare", prepare_parser(), help="prepare a dataset directory")
    commands.add_subcommand("synthetic", synthetic_parser(), help="write the synthetic log as files")
    args = parser.parse_args(argv)
    from recsys.data.pipeline import prepare  # after parsing: --help and bad options need none of it (torch)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)

    def command() -> None:
        if args.command == "prepare":
            a = args.prepare.as_dict()
            a["vectors"] = parse_vectors(a["vectors"])
            out = prepare(a.pop("interactions"), a.pop("out"), **a)
            log.info("wrote %s", out)
        else:
            a = args.synthetic.as_dict()
            files = write_synthetic(SyntheticConfig(**{f.name: a[f.name] for f in dataclasses.fields(SyntheticConfig)}), a["out"])
            log.info(
                "prepare it with: python -m recsys.data prepare --interactions %s --items %s --time-col timestamp "
                "--category-cols tags --vectors text=%s --out DIR", files.interactions, files.items, files.vectors,
            )

    return exit_code_of(command)


if __name__ == "__main__":
    sys.exit(main())
