"""Two CPU processes (DDP over gloo): when only one process meets non-finite values, every process
stops with the same DivergedError, none is left waiting in a collective for the one that stopped.

Before, the process that met them raised alone; the other failed on a closed connection (gloo) or
would have waited for it until the collective's timeout (NCCL).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import contextlib
    import sys

    import lightning as L

    from recsys.data import SequenceDataModule
    from recsys.model import DivergedError, MatryoshkaRecommender

    where = sys.argv[2]


    @contextlib.contextmanager
    def nan_from(module, name):
        original = getattr(module, name)
        setattr(module, name, lambda *args, **kwargs: original(*args, **kwargs) * float("nan"))
        try:
            yield
        finally:
            setattr(module, name, original)


    class OneProcessDiverges(MatryoshkaRecommender):
        # process 1 alone meets NaN: in its third training step's item vectors (so its loss), or in
        # its validation user vectors

        def training_step(self, batch, batch_idx):
            if where == "loss" and self.global_rank == 1 and self.global_step == 2:
                with nan_from(self.net, "item_matrix"):
                    return super().training_step(batch, batch_idx)
            return super().training_step(batch, batch_idx)

        def validation_step(self, batch, batch_idx):
            if where == "users" and self.global_rank == 1:
                with nan_from(self.net, "user_vectors"):
                    return super().validation_step(batch, batch_idx)
            return super().validation_step(batch, batch_idx)


    dm = SequenceDataModule(data_dir=sys.argv[1], max_len=10, batch_size=16)
    model = OneProcessDiverges(item_features=dm.item_features, sizes=[8, 16], max_len=10)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        use_distributed_sampler=False)
    try:
        trainer.fit(model, datamodule=dm)
    except DivergedError as exc:
        print(f"process {trainer.global_rank}: DivergedError: {exc}", flush=True)
        sys.exit(2)
    print(f"process {trainer.global_rank}: finished", flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["loss", "users"])
def test_every_process_stops_when_one_meets_nan(synthetic_prepared, tmp_path, where):
    script = tmp_path / "diverge.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, str(script), str(synthetic_prepared), where], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    out = done.stdout + done.stderr
    expected = "the training loss is nan" if where == "loss" else "user vectors are not finite in validation"
    for rank in (0, 1):
        assert f"process {rank}: DivergedError: " in out and expected in out, out[-3000:]
    assert "finished" not in done.stdout and "Connection closed by peer" not in out, out[-3000:]
