"""A whole training run: build from the configuration, train epochs, evaluate, checkpoint.

Outputs in the run folder: ``config.yaml`` (resolved configuration),
``metrics.jsonl`` (one JSON object per epoch), ``checkpoint.pt`` (written
atomically and verified after every epoch, with model, optimizer, scheduler
and every random generator, so ``resume`` continues exactly), ``best.pt`` (the
same for the epoch of lowest test error so far), ``curves.png`` and, for
vector-field models, ``angles.png`` (the W–B^T angle per layer, logged as
``angle/layerN`` in the metrics). A run holds the folder's lock
(:class:`~eqprop.training.run_lock.RunLock`) while it runs: one writer per folder.
"""
from __future__ import annotations

import re
import warnings
import yaml
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import build
from ..atomic import atomic_write_text
from ..alignment import backward_angles
from ..build import Generators
from ..distributed import WORLD, World
from ..plotting import NO_PLOTS_NOTE, PLOTS_AVAILABLE
from ..solvers import WarmStart
from ..config import ConfigError, RunConfig, config_to_yaml, validate_config
from ..data import resolve_data_root
from .checkpoint import (BEST_CHECKPOINT, CHECKPOINT, CheckpointError, checkpoint_in, config_fingerprint,
                         load_checkpoint, load_model_state, save_checkpoint)
from .loop import DivergenceError, evaluate, train_epoch
from .metrics import append_metrics, parameter_norms, plot_curves, read_metrics, write_metrics
from .callbacks import Callback, TensorBoardLogger
from .collapse import CHANCE_MARGIN, CollapseGuard, collapse_reason
from .run_info import RUN_INFO, record_session, session_info
from .run_lock import LOCK_FILE, RunLock
from .time_limit import TimeLimit

WARM_START = "warm_start.pt"  # solver.warm_start: the training samples' last free steady states
METRICS = "metrics.jsonl"
ROLLED_BACK = "rolled_back.jsonl"  # train.on_collapse rollback: the epochs a rollback undid
CONFIG = "config.yaml"


class DeadRunError(DivergenceError):
    """Training stays at chance level: the run stops (``train.stop_at_chance``)."""


class CollapseError(DivergenceError):
    """The run collapsed after having learned and ``train.on_collapse`` stops it."""


def checkpoint_config(path: Path, checkpoint: dict[str, Any] | None = None) -> RunConfig:
    """The configuration stored in a checkpoint (``checkpoint``: its already loaded content),
    validated: fields added since the checkpoint was written take their defaults."""
    try:
        return validate_config((checkpoint or load_checkpoint(path))["config"])
    except ConfigError as error:
        raise CheckpointError(f"checkpoint {path} holds an unusable configuration ({error})") from None


def train(config: RunConfig, out_dir: str | Path, *, data_dir: str | Path | None = None, download: bool = False,
          resume: bool = False, show_progress: bool = False, log: Callable[[str], None] = print,
          callbacks: Sequence[Callback] = (), world: World = WORLD,
          time_limit: float | None = None) -> list[dict[str, Any]]:
    """Train ``config`` in ``out_dir`` (continuing its checkpoint when ``resume``, up to
    ``config.train.epochs``); return the metrics of every epoch of the run. The folder is locked
    for the whole run; a resumed run that already reached its target trains nothing.
    ``callbacks``: a user's hooks, called after every batch and every epoch
    (:class:`~eqprop.training.callbacks.Callback`). ``world``: this process's place in a
    distributed run (:mod:`eqprop.distributed`); only rank 0 reads and writes the folder, logs and
    calls the callbacks. ``time_limit``: seconds from this call; the run stops after the last epoch
    expected to end within them (:class:`~eqprop.training.time_limit.TimeLimit`), short of its
    target if need be, and ``resume`` continues it."""
    out_dir = Path(out_dir)
    limit = None if time_limit is None else TimeLimit(time_limit)
    if not resume and not world.distributed:
        _check_fresh_folder(out_dir)  # before the lock, which would leave its file in a folder refused
    if not world.is_main:
        return _train_locked(resolve_schedule(config), out_dir, data_dir, download, resume, False,
                             lambda _: None, [], world, limit)
    created = not out_dir.exists()
    try:
        with RunLock(out_dir):
            return _train_locked(resolve_schedule(config), out_dir, data_dir, download, resume, show_progress, log,
                                 list(callbacks), world, limit)
    except BaseException:
        if created:
            _remove_unused_folder(out_dir)
        raise


def _remove_unused_folder(out_dir: Path) -> None:
    """Remove the folder a run created and failed in before writing anything (missing data, say), so
    that failed attempts leave no empty run folders behind; anything else in it keeps it."""
    try:
        if [entry.name for entry in out_dir.iterdir()] == [LOCK_FILE]:
            (out_dir / LOCK_FILE).unlink()
            out_dir.rmdir()
    except OSError:
        pass  # another process took the folder meanwhile: it is theirs


def finished_message(out_dir: Path, done: int, target: int) -> str:
    """What resuming a run that has reached its target says."""
    return f"{out_dir} is finished: epoch {done} of {target} is done (train it further with --epochs N)"


def run_fingerprint(out_dir: Path) -> str | None:
    """The fingerprint of the model of the run in ``out_dir`` (from its ``config.yaml``), if any."""
    try:
        stored = yaml.safe_load((Path(out_dir) / CONFIG).read_text(errors="replace"))
    except (OSError, yaml.YAMLError):
        return None
    return config_fingerprint(stored) if isinstance(stored, dict) else None


def _check_fresh_folder(out_dir: Path) -> None:
    """Refuse to start a run in a folder that holds something else: the run would overwrite files of
    that name (a user's own ``config.yaml``, say). A folder where a run started but saved no epoch
    (it has ``run.json``) may start again, as may an empty one."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is a file, not a folder: choose another --out")
    if not out_dir.is_dir() or (out_dir / RUN_INFO).exists():
        return
    foreign = sorted(entry.name for entry in out_dir.iterdir() if entry.name != LOCK_FILE)
    if foreign:
        listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ConfigError(f"{out_dir} is not empty ({listed}) and holds no eqprop run: choose another --out")


def _opening(config: RunConfig, out_dir: Path, resume: bool,
             log: Callable[[str], None]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """What the run folder holds for this run: the checkpoint to resume (None: a fresh run) and the
    recorded epochs (all of them for a finished run, which then trains nothing)."""
    checkpoint_path = out_dir / CHECKPOINT
    if not resume and checkpoint_path.exists():
        raise ConfigError(f"{out_dir} already holds a run: continue it with --resume {out_dir} "
                          "or choose another --out")
    if not resume:
        _check_fresh_folder(out_dir)
        return None, []
    checkpoint = load_checkpoint(checkpoint_path, run_fingerprint(out_dir))
    _check_resumable(checkpoint, config, checkpoint_path)
    done, target = int(checkpoint["epoch"]), config.train.epochs
    stored_target = int(checkpoint["config"]["train"]["epochs"])
    records = [r for r in read_metrics(out_dir / METRICS) if r["epoch"] <= done]
    if done >= target:
        log(finished_message(out_dir, done, target))
        return None, records
    if target != stored_target:
        log(f"the target of {out_dir} changes from {stored_target} to {target} epochs")
    return checkpoint, records


def _train_locked(config: RunConfig, out_dir: Path, data_dir: str | Path | None, download: bool, resume: bool,
                  show_progress: bool, log: Callable[[str], None], callbacks: list[Callback],
                  world: World, limit: TimeLimit | None = None) -> list[dict[str, Any]]:
    checkpoint_path = out_dir / CHECKPOINT
    # rank 0 reads the folder; every rank gets what it read, or the error it met
    try:
        opened: Any = _opening(config, out_dir, resume, log) if world.is_main else None
    except (ConfigError, CheckpointError) as error:
        opened = error
    opened = world.broadcast(opened)
    if isinstance(opened, Exception):
        raise opened
    checkpoint, records = opened
    if resume and checkpoint is None:
        return records  # finished

    if checkpoint is not None and data_dir is None:
        data_dir = recorded_data_root(checkpoint, log)  # resume reads the data the run was started with
    run = build.build_run(config, data_dir=data_dir, download=download, world=world)
    config = run.config  # with its CPU setting resolved: what config.yaml and the checkpoint keep
    for note in run.notes + ([] if PLOTS_AVAILABLE else [NO_PLOTS_NOTE]):
        log(note)
    model, estimator, optimizer, scheduler = run.model, run.estimator, run.optimizer, run.scheduler
    generators, device, root = run.generators, run.device, run.data_root

    main = world.is_main
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    first_epoch = 1
    if checkpoint is not None:
        first_epoch = _restore(checkpoint, checkpoint_path, model, optimizer, scheduler, generators, device) + 1
        records = [r for r in records if r["epoch"] < first_epoch]
        if main:
            write_metrics(out_dir / METRICS, records)
        log(f"resuming {out_dir} after epoch {first_epoch - 1}")
        if run.warm_start is not None:
            _restore_warm_start(run.warm_start, out_dir / WARM_START, first_epoch - 1, device, log)
    if world.distributed:
        log(f"distributed: {world.size} processes, {config.train.batch_size // world.size} samples each of every "
            f"batch of {config.train.batch_size}; learning rates {[g['lr'] for g in optimizer.param_groups]}")
    if main:
        # run.json first: it marks the folder as this run's before config.yaml replaces any file
        record_session(out_dir, session_info(device, run.phases_run_in, first_epoch) | {"world_size": world.size})
        atomic_write_text(out_dir / CONFIG, config_to_yaml(config))
    if config.train.tensorboard and main:
        try:
            callbacks = callbacks + [TensorBoardLogger(out_dir / "tensorboard")]
        except ImportError as error:
            raise ConfigError(str(error)) from None
    on_batch = [c.on_batch for c in callbacks if type(c).on_batch is not Callback.on_batch]

    chance = chance_error(run.train_loader.labels)
    train_settings = config.train
    guard = CollapseGuard(train_settings.on_collapse, train_settings.rollback_lr_factor,
                          train_settings.max_rollbacks, int((checkpoint or {}).get("rollbacks", 0)),
                          float((checkpoint or {}).get("lr_scale", 1.0)))
    rolled_back: dict[str, Any] | None = None  # the rollback that the next recorded epoch follows

    def payload(epoch: int) -> dict[str, Any]:
        """Everything a checkpoint keeps of the run as it stands after ``epoch``."""
        return {"config": config.model_dump(mode="json"), "epoch": epoch, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "generators": generators.state(), "device": device.type,
                "data_dir": None if root is None else str(root.absolute()), "rollbacks": guard.rollbacks,
                "lr_scale": guard.lr_scale}

    epoch = first_epoch
    while epoch <= config.train.epochs:
        # rank 0's clock decides for every rank, so that all stop after the same epoch
        if limit is not None and not world.broadcast(limit.another_epoch_fits()):
            log(f"time limit {limit.describe()}: stopping after epoch {epoch - 1} of {config.train.epochs}, since "
                f"another epoch (about {limit.expected_epoch():.0f} s) would end after it")
            break
        run.backend.before_epoch()
        if world.distributed:  # each rank's dropout stream, from the seed, its rank and the epoch alone
            generators.model.manual_seed(Generators.model_seed(config.train.seed, epoch) + 1_000_003 * world.rank)
        try:
            stats = train_epoch(model, estimator, optimizer, run.train_loader, epoch, show_progress=show_progress,
                                angle_every=config.train.angle_every,
                                angle_bptt_steps=config.estimator.bptt_steps,
                                bf16_autocast=config.train.bf16_autocast, warm_start=run.warm_start,
                                on_batch=on_batch)
            with warnings.catch_warnings():
                if estimator.moves_weights:  # they never call optimizer.step(), which torch warns about
                    warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
                scheduler.step()
            test_loss, test_error, test_solver = evaluate(model, run.test_loader, run.solvers[0],
                                                          config.dynamics.t1)
            collapse = (collapse_reason(epoch, records, test_error, chance)
                        if train_settings.on_collapse != "continue" else None)
        except DivergenceError as error:
            collapse = str(error)
        if collapse:
            best = _best_state(out_dir, world) if guard.can_roll_back() else None
            if best is None:
                if train_settings.on_collapse != "rollback":
                    advice = "try smaller learning rates or β" + (", or set train.on_collapse=rollback"
                                                                  if (out_dir / BEST_CHECKPOINT).exists() else "")
                elif guard.rollbacks >= guard.max_rollbacks:
                    advice = f"{guard.rollbacks} rollback(s) made, train.max_rollbacks is {guard.max_rollbacks}"
                else:
                    advice = f"no {BEST_CHECKPOINT} to roll back to; try smaller learning rates or β"
                raise CollapseError(f"{collapse}; {_what_is_kept(out_dir, epoch - 1)}; {advice}")
            best_epoch = _restore(best, out_dir / BEST_CHECKPOINT, model, optimizer, scheduler, generators, device)
            guard.rescale(optimizer, scheduler, float(best.get("lr_scale", 1.0)))
            undone = [r for r in records if r["epoch"] > best_epoch] + [{"epoch": epoch, "collapse": collapse}]
            records = [r for r in records if r["epoch"] <= best_epoch]
            rolled_back = {"reason": collapse, "from_epoch": epoch, "rollbacks": guard.rollbacks,
                           "lr_scale": guard.lr_scale}
            if main:  # the folder rewound with the run: a resume continues from the best epoch too
                for record in undone:  # kept: how the run got to the collapse
                    append_metrics(out_dir / ROLLED_BACK, record | {"rollback": guard.rollbacks})
                write_metrics(out_dir / METRICS, records)
                save_checkpoint(checkpoint_path, payload(best_epoch))
            log(f"{collapse}; rolled back to epoch {best_epoch} (the best) with the learning rates times "
                f"{guard.lr_scale:g} (rollback {guard.rollbacks} of {guard.max_rollbacks})")
            epoch = best_epoch + 1
            continue
        record = {"epoch": epoch, "train_loss": stats.loss, "train_error": stats.error,
                  "test_loss": test_loss, "test_error": test_error, "epoch_seconds": stats.seconds,
                  "samples_per_second": stats.samples_per_second,
                  "lr": [group["lr"] for group in optimizer.param_groups],
                  **stats.solver, **{f"test_{key}": value for key, value in test_solver.items()},
                  **{f"angle/{layer}": angle for layer, angle in backward_angles(model).items()},
                  **parameter_norms(model)}
        if stats.gradient_angles:
            record["gradient_angles"] = stats.gradient_angles
        if run.warm_start is not None:
            record["warm_start_bytes"] = run.warm_start.bytes
        if run.phases_run_in == "c_kernel":
            record["cpu_kernel_threads"] = run.backend.threads
        if rolled_back is not None:
            record["rollback"], rolled_back = rolled_back, None
        if main:
            state = payload(epoch)
            # metrics, then the best, then the checkpoint: a crash in between leaves files that
            # resume redoes identically (it drops metrics lines after the checkpoint's epoch)
            append_metrics(out_dir / METRICS, record)
            if run.warm_start is not None:  # before the checkpoint: resume then finds the states of its epoch
                save_checkpoint(out_dir / WARM_START, {"epoch": epoch, "warm_start": run.warm_start.state_dict()})
            if all(test_error < r["test_error"] for r in records):
                save_checkpoint(out_dir / BEST_CHECKPOINT, state)
            save_checkpoint(checkpoint_path, state)
        records.append(record)
        if main:
            plot_curves(out_dir, records, config.name)
        log(f"epoch {epoch}/{config.train.epochs}  train loss {stats.loss:.4f}  train error "
            f"{100 * stats.error:.2f}%  test error {100 * test_error:.2f}%  "
            f"{stats.seconds:.1f} s ({stats.samples_per_second:.0f} samples/s){_steps_text(stats.solver)}")
        for callback in callbacks:
            callback.on_epoch(epoch, record)
        warning = collapse_warning(records)
        if warning:
            log(warning)
        dead = dead_run_message(records, chance, config.train.stop_at_chance)
        if dead:
            raise DeadRunError(f"{dead}; {_what_is_kept(out_dir, epoch)}")
        epoch += 1
    return records


def _best_state(out_dir: Path, world: World) -> dict[str, Any] | None:
    """The content of the run's ``best.pt`` (None: there is none yet), read by rank 0 and shared."""
    path = out_dir / BEST_CHECKPOINT
    best = load_checkpoint(path) if world.is_main and path.exists() else None
    return world.broadcast(best)


def chance_error(labels: torch.Tensor) -> float:
    """The training error of a network that has learned nothing: guessing, or predicting the most
    frequent class, whichever errs less."""
    counts = torch.bincount(labels.flatten().to("cpu", torch.int64))
    return 1.0 - float(counts.max()) / max(int(counts.sum()), 1)


def dead_run_message(records: list[dict[str, Any]], chance: float, epochs: int | None) -> str | None:
    """One line when the training error has stayed within :data:`CHANCE_MARGIN` of ``chance`` for
    the last ``epochs`` epochs (None: never)."""
    if epochs is None or len(records) < epochs:
        return None
    recent = records[-epochs:]
    if all(r["train_error"] >= chance - CHANCE_MARGIN for r in recent):
        errors = ", ".join(f"{100 * r['train_error']:.1f}%" for r in recent)
        return (f"training stopped: the training error stayed at chance level ({100 * chance:.1f}%) for "
                f"{epochs} epochs ({errors}): the network does not learn; check the learning rates and β, or "
                "set train.stop_at_chance to null to train on")
    return None


def _what_is_kept(out_dir: Path, epoch: int) -> str:
    """What the run folder holds after a stop, said only of files that exist."""
    if epoch < 1 or not (out_dir / CHECKPOINT).exists():
        return "nothing was saved (no epoch was completed)"
    kept = f"{CHECKPOINT} keeps epoch {epoch}"
    best = [r for r in read_metrics(out_dir / METRICS) if r["epoch"] <= epoch]
    if best and (out_dir / BEST_CHECKPOINT).exists():
        top = min(best, key=lambda r: r["test_error"])
        kept += f", {BEST_CHECKPOINT} epoch {top['epoch']} ({100 * top['test_error']:.2f}% test error)"
    return kept


def collapse_warning(records: list[dict[str, Any]]) -> str | None:
    """A warning when the last epoch's test error is more than twice the best one and above 50%.

    A network can fall into saturation without any NaN (continual VF did, at the paper's
    rates): the divergence check does not fire, but the best weights are still in best.pt.
    """
    *earlier, last = records
    if not earlier:
        return None
    best = min(earlier, key=lambda r: r["test_error"])
    if last["test_error"] > max(0.5, 2 * best["test_error"]):
        return (f"warning: test error {100 * last['test_error']:.2f}% is far above the best "
                f"{100 * best['test_error']:.2f}% (epoch {best['epoch']}): the network may have collapsed; "
                f"{BEST_CHECKPOINT} keeps epoch {best['epoch']}")
    return None


def _steps_text(solver: dict[str, float]) -> str:
    """The epoch line's mean steps per phase, where a solver chooses them."""
    parts = [f"{name} {solver[f'{name}_steps']:.1f}" for name in ("free", "nudged") if f"{name}_steps" in solver]
    return f"  steps: {', '.join(parts)}" if parts else ""


def resolve_schedule(config: RunConfig) -> RunConfig:
    """Make a cosine schedule's default length explicit (``t_max`` = the run's epochs), so that
    a run extended by ``--resume --epochs N`` keeps the schedule it started with."""
    if config.schedule.name != "cosine" or config.schedule.t_max is not None:
        return config
    schedule = config.schedule.model_copy(update={"t_max": config.train.epochs})
    return config.model_copy(update={"schedule": schedule})


def _check_resumable(checkpoint: dict[str, Any], config: RunConfig, path: Path) -> None:
    """Refuse to continue a checkpoint with another model, optimizer or schedule (their states
    in the checkpoint would silently override the new settings)."""
    stored = resolve_schedule(checkpoint_config(path, checkpoint)).model_dump(mode="json")
    for section in ("model", "optim", "schedule"):
        now = getattr(config, section).model_dump(mode="json")
        if stored[section] != now:
            changed = sorted(k for k in now if stored[section].get(k) != now[k])
            raise CheckpointError(f"checkpoint {path} was trained with other {section} settings "
                                  f"({', '.join(f'{section}.{k}' for k in changed)}); resume keeps them")


def _restore_warm_start(warm_start: WarmStart, path: Path, epoch: int, device: torch.device,
                        log: Callable[[str], None]) -> None:
    """The warm-start states saved with epoch ``epoch``; without them (a file missing, of another
    epoch or damaged) the samples start cold again, which the run says."""
    if not path.exists():
        log(f"warm start: {path.parent} holds no saved states (the run had no warm start); every sample "
            "starts cold")
        return
    try:
        saved = load_checkpoint(path)
        if saved.get("epoch") != epoch:
            raise CheckpointError(f"{path} holds the states of epoch {saved.get('epoch')}, not {epoch}")
        state = dict(saved["warm_start"])
        state["layers"] = [t.to(device) for t in state["layers"]]
        state["seen"] = state["seen"].to(device) if state["seen"] is not None else None
        warm_start.load_state_dict(state)
    except (CheckpointError, KeyError, TypeError, ValueError, AttributeError) as error:
        log(f"warm start: the saved states cannot be used ({str(error).splitlines()[0]}); every sample starts "
            "cold again")


def _restore(checkpoint: dict[str, Any], path: Path, model: torch.nn.Module,
             optimizer: torch.optim.Optimizer, scheduler: Any, generators: Generators,
             device: torch.device) -> int:
    """Load every state of ``checkpoint`` into the run's objects; return its epoch.

    A run moved to another kind of device continues with the same data order and
    random signs (CPU generators), but device generators cannot carry over: the
    dropout stream is then re-seeded from the seed and the epoch.
    """
    load_model_state(model, checkpoint.get("model"), path)
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        epoch = int(checkpoint["epoch"])
        states = dict(checkpoint["generators"])
        if checkpoint.get("device", device.type) != device.type:
            states.pop("model")
            generators.model.manual_seed(Generators.model_seed(int(checkpoint["config"]["train"]["seed"]), epoch))
        generators.restore(states)
        return epoch
    except (KeyError, RuntimeError, ValueError, TypeError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise CheckpointError(f"checkpoint {path} does not fit this run ({reason})") from None


def recorded_data_root(checkpoint: dict[str, Any], log: Callable[[str], None] = lambda _: None) -> str | None:
    """The data root a checkpoint's run read, while that folder is still there; else None, the
    default root ($EQPROP_DATA, then the cache), for a run carried to another machine or folder."""
    stored = checkpoint.get("data_dir")
    if stored is None or Path(stored).is_dir():
        return stored
    log(f"the run's data root {stored} is not here: reading the data from {resolve_data_root(None)}")
    return None


def evaluate_checkpoint(path: Path, *, data_dir: str | Path | None = None, download: bool = False,
                        device: str | None = None, test_subset: int | None = None,
                        overrides: dict[str, Any] | None = None, show_progress: bool = False) -> dict[str, Any]:
    """Test loss and error of the model saved in a checkpoint (a file, or a run folder: its
    latest checkpoint), and the free phase's steps. ``overrides``: configuration sections to
    change for the evaluation (e.g. ``{"solver": {"name": "anderson"}}``); the model's own
    settings cannot be changed."""
    path = checkpoint_in(path)
    checkpoint = load_checkpoint(path, run_fingerprint(path.parent))
    config = checkpoint_config(path, checkpoint)
    if data_dir is None:
        data_dir = recorded_data_root(checkpoint)  # the data the run was trained on
    data = config.model_dump(mode="json")
    for section, values in (overrides or {}).items():
        if section == "model":
            raise ConfigError("eval: the model's settings come from the checkpoint and cannot be changed")
        data.setdefault(section, {}).update(values)
    if device is not None:
        data["train"]["device"] = device
    run = build.build_run(validate_config(data), data_dir=data_dir, download=download, training=False,
                          test_subset=test_subset)
    load_model_state(run.model, checkpoint.get("model"), path)
    loss, error, solver = evaluate(run.model, run.test_loader, run.solvers[0], run.config.dynamics.t1,
                                   show_progress=show_progress)
    return {"epoch": int(checkpoint["epoch"]), "test_loss": loss, "test_error": error,
            "samples": run.test_loader.num_examples, **solver}
