"""The command line of ``python -m serving.candidates`` (and of the script ``recsys-candidates``):
:func:`main`, and the pieces ``python -m serving.ray_candidates`` shares with it. The parser itself is
``serving/cli.py``'s, so that ``__main__.py`` answers ``--help`` before this module imports torch."""

from __future__ import annotations

from pathlib import Path

from recsys.errors import exit_code_of
from serving.candidates import __doc__ as OVERVIEW
from serving.candidates.job import generate_candidates
from serving.cli import candidates_parser


def time_column_of(value: str | None) -> str | None:
    """``--time-col`` as the job takes it: empty or "none" means no column (order by file row)."""
    return None if value in (None, "", "none", "None") else value


def summary_line(manifest: dict, out: str | Path) -> str:
    """The one line a finished job prints (``serving.candidates`` and ``serving.ray_candidates``)."""
    c = manifest["counts"]
    return (f"{c['users']} users, {c['fallback_users']} with the popular fallback, {c['unknown_items_skipped']} unknown "
            f"item ids skipped, {c['rows']} rows in {c['parts']} parts, {manifest.get('elapsed_s', 0):.1f} s -> {out}")


def job_options(args) -> dict:
    """The keyword options both candidate jobs take, from their shared command line."""
    return {
        "user_col": args.user_col, "item_col": args.item_col, "time_col": time_column_of(args.time_col),
        "history_col": args.history_col, "shard": args.shard, "batch_size": args.batch_size,
        "exclude_seen": args.exclude_seen, "users_per_part": args.users_per_part, "device": args.device,
    }


def main(argv: list[str] | None = None) -> int:
    args = candidates_parser(OVERVIEW).parse_args(argv)
    options = job_options(args)

    def run() -> None:
        manifest = generate_candidates(args.model, args.input, args.out, args.k, **options)
        print(summary_line(manifest, args.out))

    return exit_code_of(run)
