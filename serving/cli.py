"""The command lines of ``python -m serving.export`` and ``python -m serving.candidates``.

They live apart from the commands, and import nothing but the parser, so that each command answers
``--help`` (and builds its parser) before it imports torch. Each takes its command's module
docstring, whose first paragraph is the description.
"""

from __future__ import annotations

import argparse

from jsonargparse import ArgumentParser


def export_parser(doc: str) -> ArgumentParser:
    parser = ArgumentParser(prog="python -m serving.export", description=doc.split("\n\n")[0])
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


def candidates_parser(doc: str) -> ArgumentParser:
    parser = ArgumentParser(prog="python -m serving.candidates", description=doc.split("\n\n")[0])
    parser.add_argument("--model", type=str, required=True, help="export directory of one size (python -m serving.export)")
    parser.add_argument("--input", type=str, required=True,
                        help="interaction log or history table: .parquet, .csv, .tsv or a directory of .parquet")
    parser.add_argument("--k", type=int, default=100, help="candidates per user")
    parser.add_argument("--out", type=str, required=True, help="output directory (parts + manifest)")
    parser.add_argument("--user-col", type=str, default="user_id", help="user id column")
    parser.add_argument("--item-col", type=str, default="item_id", help="item id column (interaction log)")
    parser.add_argument("--time-col", type=str | None, default="timestamp",
                        help="time or order column (interaction log); none = file row order")
    parser.add_argument("--history-col", type=str | None, default=None,
                        help="list column of item ids, oldest first: the input is a history table")
    parser.add_argument("--shard", type=str, default="0/1", help="i/n: process shard i of n (stable hash of the user id)")
    parser.add_argument("--batch-size", type=int, default=1024, help="users scored per batch")
    parser.add_argument("--exclude-seen", action=argparse.BooleanOptionalAction, default=True,
                        help="leave out items in the user's history")
    parser.add_argument("--users-per-part", "--users-per-shard", type=int, default=100_000,
                        help="users per output part file")
    parser.add_argument("--device", type=str, default="auto", help="auto (GPU when present), cpu or cuda")
    return parser
