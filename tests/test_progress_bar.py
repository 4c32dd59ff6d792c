"""The training progress bar counts epochs from 1 (issue 32: it said ``Epoch 7/7`` for 8 epochs)."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel

from recsys.console import epoch_description
from recsys.train import EpochRichProgressBar, EpochTQDMProgressBar, SaveOnSigterm, epoch_progress_bar, with_epoch_progress_bar

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


def test_epochs_are_counted_from_one_of_max_epochs():
    assert epoch_description(0, 8) == "Epoch 1/8"
    assert epoch_description(7, 8) == "Epoch 8/8"
    assert epoch_description(7, None) == "Epoch 8"
    assert epoch_description(7, -1) == "Epoch 8"  # -1: until stopped


class RecordingRich(EpochRichProgressBar):
    def on_train_epoch_start(self, trainer, *args):
        super().on_train_epoch_start(trainer, *args)
        self.seen.append(self.progress.tasks[self.train_progress_bar_id].description.strip())


class RecordingTQDM(EpochTQDMProgressBar):
    def on_train_epoch_start(self, trainer, *args):
        super().on_train_epoch_start(trainer, *args)
        self.seen.append(self.train_progress_bar.desc.rstrip(": "))


@pytest.mark.parametrize("bar_class", [RecordingRich, RecordingTQDM])
def test_a_two_epoch_run_shows_epoch_1_of_2_then_2_of_2(bar_class, tmp_path):
    bar = bar_class()
    bar.seen = []
    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, callbacks=[bar], logger=False,
                        enable_checkpointing=False, enable_model_summary=False, accelerator="cpu",
                        default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(BoringModel())
    assert bar.seen == ["Epoch 1/2", "Epoch 2/2"]


def test_training_gets_the_bar_lightning_would_choose_unless_the_bar_is_off_or_given():
    sigterm = SaveOnSigterm()
    defaults = {"max_epochs": 8, "callbacks": [sigterm]}
    added = with_epoch_progress_bar(defaults, {"enable_progress_bar": None, "callbacks": None})
    assert added["callbacks"][0] is sigterm and len(added["callbacks"]) == 2
    bar = added["callbacks"][1]
    assert isinstance(bar, (EpochRichProgressBar, EpochTQDMProgressBar))
    assert isinstance(epoch_progress_bar(), RichProgressBar) == isinstance(bar, RichProgressBar)  # rich where installed
    assert defaults["callbacks"] == [sigterm]  # the defaults themselves are left as they were
    assert with_epoch_progress_bar(defaults, {"enable_progress_bar": False}) is defaults
    own: ProgressBar = TQDMProgressBar()
    assert with_epoch_progress_bar(defaults, {"callbacks": [own]}) is defaults


@pytest.mark.parametrize("bar_on", [True, False])
def test_the_training_command_shows_the_epoch_bar(tmp_path, monkeypatch, bar_on):
    """``recsys.train`` builds its trainer with the bar (not Lightning's own), and none with
    ``--trainer.enable_progress_bar false``; nothing is trained here."""
    import recsys.train as train

    seen = {}

    def record(cli, on_sigterm):
        seen["bar"], seen["max_epochs"] = cli.trainer.progress_bar_callback, cli.trainer.max_epochs
        return {}

    monkeypatch.setattr(train, "_train_and_record", record)
    train.run([
        "--model.sizes", "[8, 16]", "--data.synthetic.num_users", "60", "--data.synthetic.num_items", "50",
        "--data.synthetic_cache_dir", str(tmp_path / "synthetic"), "--data.max_len", "10", "--trainer.max_epochs", "8",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", str(bar_on).lower(),
        "--tracking", "csv", "--run_dir", str(tmp_path / "run"), "--checkpoint.dirpath", str(tmp_path / "ckpt"),
    ])
    if bar_on:
        assert isinstance(seen["bar"], (EpochRichProgressBar, EpochTQDMProgressBar)) and seen["max_epochs"] == 8
    else:
        assert seen["bar"] is None
