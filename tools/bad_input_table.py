"""Write the table of what each command does with bad input (in ``docs/usage.md``), from the tests' own cases.

    python tools/bad_input_table.py            # rewrite the table between the page's markers
    python tools/bad_input_table.py --check    # exit 1 when the page's table differs

The cases are ``BAD_INPUTS`` in ``tests/test_reliability.py``, which also checks each one (exit status
2 and one ``error:`` line, nothing written) and that the page's rows match them. This script runs
every case the same way, each in its own temporary directory, and records the message the user sees.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import re
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("bad_input_table")


def load_cases():
    """``tests/test_reliability.py`` as a module (the tests directory is not a package)."""
    spec = importlib.util.spec_from_file_location("test_reliability", ROOT / "tests" / "test_reliability.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def cell(text: str) -> str:
    """A table cell holding ``text`` as code: pipes escaped, backticks inside allowed."""
    return "`` " + text.replace("|", "\\|") + " ``"


def build_table(cases) -> str:
    rows = ["| Command | Bad input | What the user sees |", "|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        resources = cases.build_resources(Path(tmp) / "resources")
        for index, case in enumerate(cases.BAD_INPUTS):
            workdir = Path(tmp) / f"case-{index:02d}"
            workdir.mkdir()
            outcome = cases.run_bad_input(case, workdir, resources)
            shown = f"{outcome.status}: {outcome.message}" if case.command == "serving.load" else f"error: {outcome.message}"
            shown = re.sub(r"\(pid \d+\)", "(pid 4242)", shown)  # the holder's process id differs every run
            if case.command != "serving.load" and outcome.status != 2:
                log.warning("%s: exit status %s, expected 2", case.id, outcome.status)
            log.info("%s -> %s", case.id, shown)
            rows.append(f"| `{cases.command_label(case.command)}` | {case.case} | {cell(shown)} |")
    return "\n".join(rows)


def replace_table(page: str, table: str, start: str, end: str) -> str:
    if start not in page or end not in page:
        raise SystemExit(f"the page has no {start} ... {end} markers")
    before, rest = page.split(start, 1)
    _, after = rest.split(end, 1)
    return f"{before}{start}\n{table}\n{end}{after}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the page differs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore")
    cases = load_cases()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "recsys", "serving", "mlflow"):
        logging.getLogger(name).setLevel(logging.ERROR)  # the commands' own progress, not this table
    page = cases.TABLE_PAGE.read_text(encoding="utf-8")
    updated = replace_table(page, build_table(cases), cases.TABLE_START, cases.TABLE_END)
    if args.check:
        if updated != page:
            log.error("the bad-input table of docs/usage.md is out of date: run python tools/bad_input_table.py")
            return 1
        log.info("the bad-input table of docs/usage.md is up to date")
        return 0
    cases.TABLE_PAGE.write_text(updated, encoding="utf-8")
    log.info("wrote %d rows to %s", len(cases.BAD_INPUTS), cases.TABLE_PAGE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
