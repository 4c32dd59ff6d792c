"""The command line of ``python -m serving.candidates`` (and ``python -m serving.ray_candidates``).

It lives apart from the commands and imports nothing but the parser, so that each command answers
``--help`` (and builds its parser) before it imports torch. It takes its command's module
docstring, whose first paragraph is the description.
"""

from __future__ import annotations

import argparse

from jsonargparse import ArgumentParser


def candidates_parser(doc: str) -> ArgumentParser:
    parser = ArgumentParser(prog="python -m serving.candidates", description=doc.split("\n\n")[0])
    parser.add_argument("--model", type=str, required=True, help="export directory of one size (python -m recsys.export)")
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
