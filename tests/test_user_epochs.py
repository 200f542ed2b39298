"""The user's epochs win over MLFF's and MFFA's defaults; the defaults apply where the user set none.

Through a Lightning ``Trainer``, anomalib's ``Engine``, anomalib's CLI (``--trainer.max_epochs``) and
anomalib's benchmark job (whose Engine sets no ``max_epochs``). The default cases stop at the start of
the fit, after the trainer's epochs are settled, instead of training the paper's schedule.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from anomalib.cli import AnomalibCLI
from anomalib.engine import Engine
from anomalib.models.components import AnomalibModule
from anomalib.pipelines.benchmark.job import BenchmarkJob
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn

from anomalib_mlff.models.mffa import MFFA
from anomalib_mlff.models.mlff import MLFF
from tests import lightning_helpers as helpers
from tests.conftest import REPO_ROOT

MLFF_TINY = {"feature_dim": 32, "tem_levels": 8, "ptfem_levels": 4, "repeat": 1}
MFFA_TINY = {"use_lgffp": False, "n_gaussian_features": 20, "coreset_ratio": 0.05}


def tiny(model_class: type[AnomalibModule], **settings: object) -> AnomalibModule:
    """A random-initialised resnet18 model at 64 px with its own epoch defaults unless ``settings`` set them."""
    extra = MLFF_TINY if model_class is MLFF else MFFA_TINY
    return helpers.tiny_model(model_class, **{**extra, **settings})


class StopAtFitStart(Callback):
    """Records the trainer's settled epochs and validation interval, then stops the fit before any step."""

    class Stop(Exception):  # noqa: N818 - a signal, not an error
        """Raised to end the fit after recording."""

    max_epochs: int | None = None
    check_val_every_n_epoch: int | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del pl_module
        StopAtFitStart.max_epochs = trainer.fit_loop.max_epochs
        StopAtFitStart.check_val_every_n_epoch = trainer.check_val_every_n_epoch
        raise StopAtFitStart.Stop


class EpochLog(Callback):
    """Counts the training epochs run and whether validation saw a fitted model."""

    def __init__(self) -> None:
        self.epochs = 0
        self.validations: list[int] = []

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        self.epochs += 1

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del pl_module
        self.validations.append(trainer.current_epoch)


def completed_epochs(trainer: Trainer) -> int:
    """Training epochs the fit loop finished."""
    return trainer.fit_loop.epoch_progress.current.completed


def attach_for_fit(model: LightningModule, **trainer_args: object) -> Trainer:
    """Attach ``model`` to a fresh trainer the way ``Trainer.fit`` does, without running it."""
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, **trainer_args)
    trainer.state.fn = TrainerFn.FITTING
    model.trainer = trainer
    return trainer


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four training images and one test image per folder of the embedded brick category."""
    return helpers.small_copy(tmp_path_factory.mktemp("epochs"), n_train=4, n_test=1).parent


# ------------------------------------------------------------------ the rule, without fitting
@pytest.mark.parametrize(("model_class", "settings", "default"), [(MLFF, {}, 200), (MLFF, {"epochs": 7}, 7),
                                                                 (MFFA, {}, 65), (MFFA, {"psg_epochs": 3}, 4)])
def test_the_model_default_fills_only_an_unset_max_epochs(model_class: type, settings: dict, default: int) -> None:
    model = tiny(model_class, **settings)
    assert "max_epochs" not in model.trainer_arguments  # anomalib's Engine would let it override the user's
    assert attach_for_fit(model).max_epochs == default
    assert attach_for_fit(model, max_epochs=3).max_epochs == 3
    assert attach_for_fit(model, max_epochs=1000).max_epochs == 1000  # an explicit 1000 is not Lightning's default


def test_a_step_or_time_limit_is_a_length_the_user_set() -> None:
    model = tiny(MLFF)
    assert attach_for_fit(model, max_steps=5).fit_loop.max_epochs is None  # Lightning then trains by steps
    assert attach_for_fit(model, max_time="00:00:01:00").fit_loop.max_epochs is None


def test_attaching_for_test_or_predict_leaves_the_trainer_alone() -> None:
    model = tiny(MLFF)
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.state.fn = TrainerFn.TESTING
    model.trainer = trainer
    assert trainer.fit_loop.max_epochs is None
    assert model.trainer is trainer


def test_mffa_validates_only_after_its_last_epoch_and_refuses_what_cannot_fill() -> None:
    model = tiny(MFFA, psg_epochs=3)
    assert attach_for_fit(model, max_epochs=2).check_val_every_n_epoch == 2
    assert attach_for_fit(model).check_val_every_n_epoch == 4
    with pytest.raises(ValueError, match=r"last training epoch.*max_epochs=None"):
        attach_for_fit(model, max_steps=5)
    without_psg = tiny(MFFA, use_psg=False)
    assert without_psg.trainer_arguments["max_epochs"] == 1  # one pass, like PaDiM
    assert attach_for_fit(without_psg).max_epochs == 1
    with pytest.raises(ValueError, match=r"use_psg=False.*max_epochs=3"):
        attach_for_fit(without_psg, max_epochs=3)


# ------------------------------------------------------------------ anomalib's Engine
def fit_logged(model: AnomalibModule, max_epochs: int, tmp_path: Path, small_root: Path) -> tuple[EpochLog, Engine]:
    """Fit ``model`` with ``Engine(max_epochs=...)`` on the small data; the epoch log and the engine."""
    log = EpochLog()
    engine = helpers.quiet_engine(tmp_path, max_epochs=max_epochs, callbacks=[log])
    engine.fit(model, datamodule=helpers.datamodule(small_root))
    return log, engine


@pytest.mark.slow
def test_engine_max_epochs_wins_for_mlff(tmp_path: Path, small_root: Path) -> None:
    """``Engine(max_epochs=1).fit(MLFF())`` trains one epoch, not the model's 200."""
    model = tiny(MLFF)
    log, engine = fit_logged(model, 1, tmp_path, small_root)
    assert log.epochs == completed_epochs(engine.trainer) == 1
    assert engine.trainer.max_epochs == 1
    assert model.epochs == 200


@pytest.mark.slow
def test_engine_max_epochs_sets_mffa_psg_epochs(tmp_path: Path, small_root: Path) -> None:
    """``Engine(max_epochs=2)`` with the default 64 PSG epochs: one PSG epoch, the fill epoch, then validation."""
    model = tiny(MFFA)
    log, engine = fit_logged(model, 2, tmp_path, small_root)
    assert log.epochs == completed_epochs(engine.trainer) == 2
    assert log.validations == [1]
    assert model.model.is_fitted
    assert "train_loss_epoch" in engine.trainer.callback_metrics  # a PSG epoch ran
    assert model.psg_epochs == 64


@pytest.mark.parametrize(("model_class", "default"), [(MLFF, 200), (MFFA, 65)])
def test_engine_without_max_epochs_uses_the_paper_default(tmp_path: Path, small_root: Path, model_class: type,
                                                          default: int) -> None:
    engine = helpers.quiet_engine(tmp_path, callbacks=[StopAtFitStart()])
    with pytest.raises(StopAtFitStart.Stop):
        engine.fit(tiny(model_class), datamodule=helpers.datamodule(small_root))
    assert StopAtFitStart.max_epochs == default
    if model_class is MFFA:
        assert StopAtFitStart.check_val_every_n_epoch == default


# ------------------------------------------------------------------ anomalib's CLI
def cli_args(root: Path, small_root: Path, *extra: str) -> list[str]:
    """``anomalib train`` on the shipped MLFF CPU config (``epochs: 6``), on ``small_root``, one repeat."""
    return ["train", "--config", str(REPO_ROOT / "configs" / "mlff_cpu.yaml"), "--model", "MLFF",
            "--model.repeat", "1", "--model.visualizer", "false", "--data.root", str(small_root),
            "--default_root_dir", str(root), "--trainer.enable_progress_bar", "false", *extra]


@pytest.mark.slow
def test_cli_trainer_max_epochs_wins(tmp_path: Path, small_root: Path) -> None:
    """``anomalib train --model MLFF --trainer.max_epochs 1`` trains one epoch (the config's model says 6)."""
    cli = AnomalibCLI(cli_args(tmp_path, small_root, "--trainer.max_epochs", "1"))
    assert isinstance(cli.model, MLFF) and cli.model.epochs == 6
    assert completed_epochs(cli.engine.trainer) == 1


def test_cli_without_max_epochs_uses_the_model_epochs(tmp_path: Path, small_root: Path) -> None:
    callback = "tests.test_user_epochs.StopAtFitStart"
    with pytest.raises(StopAtFitStart.Stop):
        AnomalibCLI(cli_args(tmp_path, small_root, "--trainer.callbacks+", callback))
    assert StopAtFitStart.max_epochs == 6


# ------------------------------------------------------------------ anomalib's benchmark job
def benchmark_job(model: AnomalibModule, root: Path) -> BenchmarkJob:
    """The job anomalib's benchmark pipeline runs per model and category; its Engine sets no ``max_epochs``."""
    return BenchmarkJob(accelerator="cpu", model=model, datamodule=helpers.datamodule(root), seed=0, flat_cfg={})


@pytest.mark.slow
def test_benchmark_job_trains_the_model_epochs(small_root: Path) -> None:
    model = tiny(MLFF, epochs=2)
    results = benchmark_job(model, small_root).run()
    assert completed_epochs(model.trainer) == 2
    assert 0.0 <= results["image_AUROC"] <= 1.0


def test_benchmark_job_default_is_the_paper_epochs(small_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny(MLFF)
    seen: list[int | None] = []

    def record_and_stop() -> None:
        seen.append(model.trainer.fit_loop.max_epochs)
        raise StopAtFitStart.Stop

    monkeypatch.setattr(model, "on_fit_start", record_and_stop)
    with pytest.raises(Exception) as raised:  # noqa: PT011 - anomalib's job wraps what it raises
        benchmark_job(model, small_root).run()
    assert isinstance(raised.value, StopAtFitStart.Stop) or isinstance(raised.value.__cause__, StopAtFitStart.Stop)
    assert seen == [200]
