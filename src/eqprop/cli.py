"""The ``eqprop`` command line: ``train``, ``presets``, ``eval``, ``gdu``.

Exit status: 0 on success, 2 on a usage or configuration error, 1 on any
other failure (data, checkpoint, divergence, a run that does not learn, a run
folder in use), 75 when ``train --time-limit`` stopped a run short of its
target (resume it; 0 under torchrun, which reads any other status as a
failure), 130 when interrupted (Ctrl-C), 143 when terminated (SIGTERM).
Errors are one line on stderr; set ``EQPROP_DEBUG=1`` to see tracebacks.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import signal
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from ._version import __version__
from .config import ConfigError, RunConfig, apply_override, load_config_file, validate_config
from .build import resolve_device
from .data import DataError
from .distributed import DistributedError, finish, initialize, shutdown, world_from_environment
from .presets import load_preset, preset_names
from .training.time_limit import EXIT_TIME_LIMIT, parse_duration

DEFAULT_PRESET = "demo"


class UsageError(Exception):
    """Wrong command-line usage (exit status 2)."""


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _duration(text: str) -> float:
    """argparse type: a duration (``90s``, ``50m``, ``2h``; a bare number is minutes), in seconds."""
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line instead of exiting by itself."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="eqprop", description="Equilibrium Propagation for convergent RNNs.")
    parser.add_argument("--version", action="version", version=f"eqprop {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a network (default: the offline demo preset)")
    _add_config_arguments(train)
    train.add_argument("--epochs", type=int, help="number of epochs (train.epochs)")
    train.add_argument("--train-subset", type=int, help="train on the first N samples (data.train_subset)")
    train.add_argument("--test-subset", type=int, help="test on the first N samples (data.test_subset)")
    train.add_argument("--threads", type=int, help="CPU threads for torch (train.threads)")
    _add_data_arguments(train)
    train.add_argument("--out", type=Path, help="run folder (default runs/NAME-TIMESTAMP)")
    train.add_argument("--resume", type=Path, metavar="DIR", help="continue the run saved in DIR (with --config or "
                                                                  "--preset: start it there if DIR holds none yet)")
    train.add_argument("--time-limit", type=_duration, metavar="DURATION",
                       help="stop after the last epoch expected to end within DURATION (90s, 50m, 2h; a bare "
                            "number is minutes), exit status 75; continue with --resume")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    commands.add_parser("presets", help="list the presets, one line each")

    gdu = commands.add_parser("gdu", help="the GDU theorem check: EP's per-step updates against BPTT's gradients")
    _add_config_arguments(gdu)
    gdu.add_argument("--batch-size", type=_positive_int, help="samples in the checked batch (default train.batch_size)")
    gdu.add_argument("--t1", type=_positive_int, help="free steps (default: until the free phase has converged, "
                                                      "then K more: the theorem needs a steady state)")
    gdu.add_argument("--k", type=_positive_int, help="nudged steps compared (default dynamics.t2)")
    gdu.add_argument("--beta", type=_positive_float, help="nudging strength (default 0.01, where the theorem "
                                                          "holds, whatever the preset trains with)")
    gdu.add_argument("--estimators", help="comma list among one_sided, one_sided_neg, symmetric, c_ep, vf, c_vf "
                                          "(default: by model kind)")
    gdu.add_argument("--lr", type=_positive_float, default=1e-6,
                     help="C-EP/C-VF learning rate (default 1e-6: the theorem holds as it goes to 0; a note says "
                          "when it is too large)")
    gdu.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    gdu.add_argument("--checkpoint", type=Path, help="check the weights of a training checkpoint (a file, or a "
                                                     "run folder: its latest checkpoint)")
    gdu.add_argument("--out", type=Path, help="output folder (default runs/gdu-NAME-TIMESTAMP)")
    _add_data_arguments(gdu)

    evaluate = commands.add_parser("eval", help="test error of a saved checkpoint")
    evaluate.add_argument("--checkpoint", type=Path, required=True,
                          help="a checkpoint file (checkpoint.pt, best.pt), or a run folder: its checkpoint.pt")
    evaluate.add_argument("--device", choices=["auto", "cpu", "cuda"])
    evaluate.add_argument("--test-subset", type=_positive_int, help="evaluate on the first N test samples")
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="change a setting of the evaluation, e.g. --set solver.name=anderson (repeatable)")
    _add_data_arguments(evaluate)
    compare = commands.add_parser("compare", help="several runs side by side: a table and a plot of their curves")
    compare.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folders")
    compare.add_argument("--plot", type=Path, default=Path("compare.png"),
                         help="where the plot of the test error curves goes (default compare.png)")
    return parser


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", help=f"a named configuration (see 'eqprop presets'; default {DEFAULT_PRESET})")
    source.add_argument("--config", type=Path, help="a YAML configuration file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change one setting, e.g. --set dynamics.beta=0.2 (repeatable)")
    parser.add_argument("--seed", type=int, help="random seed: initialisation, data order, random draws (train.seed)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="train.device")


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="data root holding mnist/ and cifar10/ "
                                           "(default: $EQPROP_DATA, then ~/.cache/eqprop/data)")
    parser.add_argument("--download", action="store_true", help="fetch missing files from the official sources")


def resolve_config(args: argparse.Namespace, base: dict[str, Any] | None = None) -> RunConfig:
    """The run configuration: preset or file (or ``base``), then --set, then the shortcut flags."""
    if args.config is not None:
        data = load_config_file(args.config)
    elif args.preset is not None or base is None:
        data = load_preset(args.preset or DEFAULT_PRESET)
    else:
        data = base
    for assignment in args.overrides:
        apply_override(data, assignment)
    shortcuts = {"train.epochs": getattr(args, "epochs", None), "data.train_subset": getattr(args, "train_subset", None),
                 "data.test_subset": getattr(args, "test_subset", None), "train.seed": args.seed,
                 "train.device": args.device, "train.threads": getattr(args, "threads", None)}
    for key, value in shortcuts.items():
        if value is not None:
            section, field = key.split(".")
            data.setdefault(section, {})[field] = value
    return validate_config(data)


def command_train(args: argparse.Namespace) -> int:
    from .training.checkpoint import CheckpointError, load_checkpoint
    from .training.trainer import CHECKPOINT, checkpoint_config, finished_message, run_fingerprint, train

    if args.resume is not None and args.out is not None and args.out.resolve() != args.resume.resolve():
        raise UsageError("--resume continues in its own folder; leave out --out")
    if args.resume is not None and not (args.resume / CHECKPOINT).exists() and (args.config or args.preset):
        # a configuration and a folder without a run yet: start it there (what a command that torchrun's
        # elastic restarts repeat needs: it starts the run once and continues it afterwards)
        args.out, args.resume = args.resume, None
    if args.resume is not None:
        path = args.resume / CHECKPOINT
        checkpoint = load_checkpoint(path, run_fingerprint(args.resume))
        stored = checkpoint_config(path, checkpoint).model_dump(mode="json")
        config = resolve_config(args, base=stored)
        out_dir = args.resume
        if int(checkpoint["epoch"]) >= config.train.epochs:
            print(f"eqprop train: {finished_message(out_dir, int(checkpoint['epoch']), config.train.epochs)}")
            return 0
    else:
        config = resolve_config(args)
        out_dir = args.out or Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    world = world_from_environment()
    if world.distributed:
        if args.out is None and args.resume is None:
            raise UsageError("a distributed run needs --out (or --resume): every process must name the same folder")
        initialize(world, resolve_device(config.train.device).type, config.train.dist_timeout)
    if world.is_main:
        print(f"eqprop train: {config.name} -> {out_dir}", flush=True)
    try:
        with RememberedInterrupt() as interrupt:
            try:
                records = train(config, out_dir, data_dir=args.data_dir, download=args.download,
                                resume=args.resume is not None, log=interrupt.checked(print),
                                show_progress=not args.no_progress and sys.stderr.isatty(), world=world,
                                time_limit=args.time_limit)
                finish(world)
            except Exception as error:
                if interrupt.seen:  # what a swallowed or converted Ctrl-C left behind
                    raise KeyboardInterrupt from None
                if world.distributed and type(error) is RuntimeError:  # a collective that failed: a peer died
                    raise DistributedError(f"rank {world.rank} of {world.size} lost its peers: "
                                           f"{_first_line(error)}; the last checkpoint in {out_dir} is intact: "
                                           f"continue with --resume {out_dir}") from None
                raise
            finally:
                shutdown()
    except KeyboardInterrupt:
        how = "terminated" if interrupt.signal == signal.SIGTERM else "interrupted"
        try:
            saved = int(load_checkpoint(out_dir / CHECKPOINT)["epoch"])
        except CheckpointError:
            saved = None
        if saved is not None:
            print(f"eqprop: {how}; the epoch in progress is abandoned and epoch {saved} is saved in "
                  f"{out_dir / CHECKPOINT}: continue with 'eqprop train --resume {shlex.quote(str(out_dir))}'",
                  file=sys.stderr)
        else:
            print(f"eqprop: {how} before the first epoch ended; nothing was saved", file=sys.stderr)
        return 143 if interrupt.signal == signal.SIGTERM else 130
    if records and records[-1]["epoch"] < config.train.epochs:   # only the time limit ends a run early
        if world.is_main:
            print(f"stopped at the time limit after epoch {records[-1]['epoch']} of {config.train.epochs} "
                  f"(test error {100 * records[-1]['test_error']:.2f}%): continue with "
                  f"'eqprop train --resume {shlex.quote(str(out_dir))}'")
        return 0 if world.distributed else EXIT_TIME_LIMIT   # torchrun takes any other status for a failure
    if records and world.is_main:
        last = records[-1]
        print(f"done: test error {100 * last['test_error']:.2f}% after epoch {last['epoch']}; outputs in {out_dir}")
    return 0


def command_presets(args: argparse.Namespace) -> int:
    names = preset_names()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {load_preset(name).get('description', '')}")
    return 0


def command_eval(args: argparse.Namespace) -> int:
    from .training.trainer import evaluate_checkpoint

    overrides: dict[str, Any] = {}
    for assignment in args.overrides:
        apply_override(overrides, assignment)
    result = evaluate_checkpoint(args.checkpoint, data_dir=args.data_dir, download=args.download,
                                 device=args.device, test_subset=args.test_subset, overrides=overrides,
                                 show_progress=sys.stderr.isatty())
    print(f"epoch {result['epoch']}: test error {100 * result['test_error']:.2f}%  "
          f"test loss {result['test_loss']:.4f}  ({result['samples']} samples; free phase "
          f"{result['free_steps']:.1f} steps on average, mean residual {result['free_residual']:.2e})")
    return 0


def command_gdu(args: argparse.Namespace) -> int:
    from .gdu import gdu_command
    from .plotting import NO_PLOTS_NOTE, PLOTS_AVAILABLE
    from .training.checkpoint import checkpoint_in
    from .training.trainer import checkpoint_config

    base = None
    if args.checkpoint is not None and args.preset is None and args.config is None:
        base = checkpoint_config(checkpoint_in(args.checkpoint)).model_dump(mode="json")  # the run's own model
    config = resolve_config(args, base=base)
    if "nudge" in type(config.model).model_fields and not any(
            a.split("=", 1)[0].strip() == "model.nudge" for a in args.overrides):
        # the theorem's regime: the output nudged inside σ, unless the user asks otherwise
        config = config.model_copy(update={"model": config.model.model_copy(update={"nudge": "inside"})})
    out_dir = args.out or Path("runs") / f"gdu-{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    estimators = [e.strip() for e in args.estimators.split(",") if e.strip()] if args.estimators else None
    result = gdu_command(config, out_dir, batch_size=args.batch_size, k=args.k, beta=args.beta, t1=args.t1,
                         estimators=estimators, data_dir=args.data_dir, download=args.download,
                         lr=args.lr, dtype=args.dtype, checkpoint=args.checkpoint)
    for name, summary in result["estimators"].items():
        layers = "  ".join(f"{layer} {m['rmse_mean']:.3g}" for layer, m in summary["layers"].items())
        angle = summary["angle_deg"]
        angle = f"{angle:7.3f} deg" if angle is not None and math.isfinite(angle) else "    n/a    "
        print(f"{name:<14} angle {angle}   RMSE: {layers}")
    settings = result["settings"]
    print(f"T1 {settings['t1']}, K {settings['k']}, β {settings['beta']:g}, nudge "
          f"{'inside' if settings['nudge_inside'] else 'after'} σ, free phase "
          f"{'converged' if settings['converged'] else 'not converged'} (residual {settings['free_residual']:.1e})")
    for note in settings["regime_notes"]:
        print(f"note: {note}")
    print(f"gdu.json and plots in {out_dir}" if PLOTS_AVAILABLE else f"gdu.json in {out_dir} ({NO_PLOTS_NOTE})")
    return 0


class RememberedInterrupt:
    """Ctrl-C raises KeyboardInterrupt as usual, and is remembered.

    Library code can lose the exception: a Ctrl-C during the import of a
    compiled module (matplotlib's, at the first epoch's plot) becomes
    ``ImportError: initialization failed``, and code that catches ImportError
    then carries on. Remembered, the interrupt still stops the run: at the
    next epoch's log line (:meth:`checked`), or in place of the error it
    turned into.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.seen = False
        #: the signal that interrupted the run (SIGINT or SIGTERM), once one has
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "RememberedInterrupt":
        try:
            self._previous = {number: signal.signal(number, self._on_interrupt) for number in self.SIGNALS}
        except ValueError:  # not the main thread: signals are not ours to handle
            self._previous = {}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)

    def _on_interrupt(self, signum: int, frame: object) -> None:
        self.seen = True
        self.signal = signum
        raise KeyboardInterrupt

    def checked(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """``log``, raising KeyboardInterrupt first if an interrupt was seen and lost."""
        def checked_log(message: str) -> None:
            if self.seen:
                raise KeyboardInterrupt
            log(message)
        return checked_log


def command_compare(args: argparse.Namespace) -> int:
    from .compare import plot, read_run, table
    from .plotting import NO_PLOTS_NOTE

    runs = [read_run(folder) for folder in args.runs]
    print(table(runs))
    print(f"plot: {args.plot}" if plot(runs, args.plot) else f"no plot: {NO_PLOTS_NOTE}")
    return 0


COMMANDS = {"train": command_train, "presets": command_presets, "eval": command_eval, "gdu": command_gdu,
            "compare": command_compare}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``eqprop`` command; returns the exit status."""
    from .compare import CompareError
    from .training import CheckpointError, DivergenceError
    from .training.run_lock import RunLockedError

    _show_progress_messages()
    try:
        args = build_parser().parse_args(argv)
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return COMMANDS[args.command](args)
    except (UsageError, ConfigError) as error:
        return _fail(error, 2)
    except (DataError, CheckpointError, DivergenceError, RunLockedError, CompareError, DistributedError) as error:
        return _fail(error, 1)
    except KeyboardInterrupt:
        print("eqprop: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a bug or an OS error: still one line unless debugging
        if os.environ.get("EQPROP_DEBUG"):
            raise
        return _fail(f"{type(error).__name__}: {_first_line(error)} (set EQPROP_DEBUG=1 for the traceback)", 1)


def _show_progress_messages() -> None:
    """Send eqprop's INFO messages (download progress) to stderr, once."""
    logger = logging.getLogger("eqprop")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: object = None, line: str | None = None) -> None:
    """Warnings as one line on stderr, without the source location a user cannot act on."""
    text = str(message)
    print(text if text.startswith("eqprop:") else f"eqprop: warning: {text}", file=sys.stderr)


def _first_line(error: object) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _fail(error: object, status: int) -> int:
    world = world_from_environment()
    who = f"eqprop (rank {world.rank})" if world.distributed else "eqprop"
    print(f"{who}: error: {_first_line(error)}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
