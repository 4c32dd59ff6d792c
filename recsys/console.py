"""What our commands print on the console: their help at once, our own lines, no third-party chatter.

:func:`help_asked` lets a command answer ``--help`` before it imports torch, Lightning or MLflow
(seconds): each command checks it first. :func:`quiet_console` sets up the console of a training
run: our log lines (``recsys.*``, ``serving.*``) at INFO, every other library's at WARNING, and the
few third-party notices that say nothing about the user's data or settings switched off at their
source, each by its logger, its message or an MLflow setting (never all warnings).
:func:`ctrl_c_interrupts` makes Ctrl-C one line and exit status 130 instead of a traceback.
:func:`epoch_description` is what the training progress bar says of the epoch (``recsys.train``'s
bars): ``Epoch 8/8`` for the last of 8 epochs, where Lightning's own bars say ``Epoch 7/7``.

Standard library only: importing this costs nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

from recsys.errors import Interrupted

__all__ = ["command_of", "ctrl_c_interrupts", "epoch_description", "help_asked", "quiet_console"]

OUR_LOGGERS = ("recsys", "serving")
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"

# (message regex, category, module regex) of the third-party warnings switched off, and why.
THIRD_PARTY_WARNINGS = (
    # Lightning calls a torch API that torch has deprecated: nothing for the user to change.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\."),
    # Short epochs: the loss is logged every `log_every_n_steps` steps across epochs all the same.
    (r"The number of training batches \(\d+\) is smaller than the logging interval", Warning, r"lightning\."),
)


def help_asked(argv: list[str]) -> bool:
    """Whether the command line asks for the help (``-h`` or ``--help``)."""
    return any(arg in ("-h", "--help") for arg in argv)


def quiet_console() -> None:
    """Our INFO lines and everyone's warnings; third-party INFO lines, tips and progress bars off.

    Call it after Lightning is imported (its import sets its loggers' level); MLflow may come later.
    """
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, force=True)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    # Lightning's loggers have handlers of their own (device summary, seed, tips, "Trainer.fit stopped")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # MLflow configures its logger when imported, from MLFLOW_LOGGING_LEVEL; and its artifact
    # downloads (one per logged model, to validate the input example) draw a progress bar each.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"].upper())
    for message, category, module in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def epoch_description(current_epoch: int, max_epochs: int | None) -> str:
    """The progress bar's name of an epoch, counted from 1 as people count: ``Epoch 8/8`` for
    Lightning's 0-based ``current_epoch`` 7 of ``max_epochs`` 8; ``Epoch 8`` without a bound
    (``max_epochs`` None, or -1: train until stopped)."""
    bound = f"/{max_epochs}" if max_epochs is not None and max_epochs > 0 else ""
    return f"Epoch {current_epoch + 1}{bound}"


@contextlib.contextmanager
def ctrl_c_interrupts() -> Iterator[None]:
    """Inside the block, Ctrl-C (SIGINT) raises :class:`~recsys.errors.Interrupted` instead of
    ``KeyboardInterrupt``: Lightning turns the latter into a silent exit status 1, but lets any
    other exception through after its own cleanup (loggers closed, ``metrics.csv`` written), and
    ``exit_code_of`` prints it as one line. Processes forked meanwhile (data loader workers) get
    ``KeyboardInterrupt`` as before. Outside the main thread, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    ours = os.getpid()

    def interrupt(signum, frame) -> None:
        if os.getpid() != ours:
            raise KeyboardInterrupt
        raise Interrupted(signum, "stopped by SIGINT (Ctrl-C)")

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def command_of(module: str) -> str:
    """``python -m module`` as it works when printed: with this environment's interpreter (its
    path relative to the working directory when it lies under it, e.g. ``.venv/bin/python``), so
    that the line runs outside an activated environment too."""
    shown = str(Path(sys.executable))
    with contextlib.suppress(ValueError):
        shown = str(Path(sys.executable).relative_to(Path.cwd()))
        shown = shown if "/" in shown else f"./{shown}"  # a bare name would be looked up on PATH
    return f"{shlex.quote(shown)} -m {module}"
