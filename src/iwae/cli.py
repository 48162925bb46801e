"""The ``iwae`` command line: ``train``, ``evaluate``, ``sample`` and ``diagnose``, each a thin layer over the
library.

Mistakes a user can fix (options, data, run directories, checkpoints) are reported as one line,
``iwae: error: <problem>; <fix>``, with exit status 2 and no traceback. A training run stopped by SIGINT
or SIGTERM checkpoints first, an evaluation keeps its finished batches, and either says the command that continues
it and exits with 128 + the signal's number.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shlex
import sys
from collections.abc import Iterator, Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, NoReturn

from iwae import __version__, data
from iwae.core.objectives import ESTIMATORS, OBJECTIVES, REPARAMETERIZED_ESTIMATORS, SETTING_READERS
from iwae.eval import likelihood, snr_diagnostics, splits
from iwae.models import GaussianToy
from iwae.platform import distributed, duration, heap
from iwae.platform.device import resolve_device
from iwae.platform.threads import use_threads
from iwae.runs import (
    checkpoint,
    evaluate_ais,
    evaluation,
    lone_run,
    reproduce,
    resumable,
    rundir,
    snr_report,
    stacked_run,
)
from iwae.runs import figures as run_figures
from iwae.settings import SEED_LIMIT, SettingError, check_seed
from iwae.training import config as train_config
from iwae.training import preflight, signals

_DEFAULTS = {f.name: f.default for f in fields(train_config.TrainConfig) if f.default is not MISSING}


class UsageError(ValueError):
    """A command line that argparse cannot parse."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see {self.prog} --help")

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        """As argparse's, but an unrecognized argument is reported by the command's own parser (``see iwae train
        --help``), not the top one."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            _innermost(self, parsed).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def _innermost(parser: argparse.ArgumentParser, parsed: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command that ``parsed`` was parsed for: ``iwae diagnose snr``'s, for one."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(parsed, action.dest, None) in action.choices:
            return _innermost(action.choices[getattr(parsed, action.dest)], parsed)
    return parser


def _option(group: argparse._ActionGroup, flag: str, type_: type, help_: str, dest: str | None = None,
            metavar: str | None = None, aliases: tuple[str, ...] = ()) -> None:
    """A training option that is absent from the parsed namespace unless given, so that a resumed run
    can tell what was given again; its help shows ``TrainConfig``'s default."""
    dest = dest or flag.lstrip("-").replace("-", "_")
    default = _DEFAULTS.get(dest)
    shown = f" (default: {default})" if default is not None else ""
    metavar = metavar or {int: "N", float: "X", str: "NAME"}[type_]
    group.add_argument(flag, *aliases, dest=dest, type=type_, default=argparse.SUPPRESS, metavar=metavar,
                       help=help_ + shown, action=_Spelled if aliases else "store")


class _Spelled(argparse.Action):
    """Store an option of several spellings, and remember the one typed, by which messages name it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.options = {**getattr(namespace, "options", {}), self.dest: option_string}


def _train_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train", help="train a model, checkpointing as it goes, then evaluate it and draw its figures",
        description="Train a model into a new run directory (--out), or continue one (--resume).",
    )
    where = parser.add_argument_group("run directory")
    where.add_argument("--out", type=_directory, metavar="DIR",
                       help="a new run directory (it must not exist, or be empty)")
    where.add_argument("--resume", type=_directory, metavar="DIR", help="continue the run in DIR from its checkpoint")
    where.add_argument("--seeds", type=int, metavar="S", help="train seeds --seed .. --seed + S - 1 together as one "
                       "vectorized model, into DIR/seed-<s> (each an ordinary run directory)")
    group = parser.add_argument_group("data")
    _option(group, "--dataset", str, "a dataset name (mnist, binarized-mnist, omniglot, fashion-mnist, digits) "
            "or the path of a .npy/.npz file of values in [0, 1]", metavar="NAME_OR_PATH")
    _option(group, "--data-split", str, "paper (the paper's train/test) or code (the official code's held-out split)")
    _option(group, "--data-dir", str, "where to look for dataset files (also $IWAE_DATA_DIR)", metavar="DIR")
    group = parser.add_argument_group("model and objective")
    _option(group, "--model", str, "burda (the paper's architecture, with --layers) or sbn-H1-...-HL, a sigmoid "
            "belief network of binary layers of H1..HL units, bottom-up (e.g. sbn-200-200-200; --estimator vimco "
            "or rws)", metavar="NAME")
    _option(group, "--layers", int, "stochastic layers of the paper's architecture: 1 or 2")
    _option(group, "--objective", str, f"the bound trained on: {', '.join(OBJECTIVES)}")
    _option(group, "--k", int, "samples per example", metavar="K")
    _option(group, "--m", int, "groups of samples, for miwae and piwae (must divide k); also --groups, which "
            "torchrun passes on (it takes --m for an abbreviation of its own options)", metavar="M",
            aliases=("--groups",))
    _option(group, "--beta", float, "the ELBO's weight, for ciwae")
    _option(group, "--alpha", float, "the Renyi order, for vr (write --alpha=-inf for VR-max)")
    _option(group, "--estimator", str, f"the inference network's gradient: {', '.join(ESTIMATORS)}")
    group = parser.add_argument_group("optimisation")
    _option(group, "--schedule", str, "constant (with --epochs and --lr) or burda (3^i epochs at "
            "1e-3 * 10^(-i/7), i = 0..7)")
    _option(group, "--epochs", int, "epochs, for the constant schedule")
    _option(group, "--lr", float, "learning rate, for the constant schedule (default: 0.001)", metavar="LR")
    _option(group, "--schedule-scale", float, "multiply each burda stage's epochs by this (e.g. 0.01 for a short run)")
    _option(group, "--batch-size", int, "examples per minibatch")
    _option(group, "--beta1", float, "Adam's beta1")
    _option(group, "--beta2", float, "Adam's beta2")
    _option(group, "--adam-eps", float, "Adam's epsilon")
    _option(group, "--seed", int, "seed of initialisation, sampling, shuffling and binarization")
    _option(group, "--init-from", str, "start from the parameters of the run in DIR, as its latest checkpoint holds "
            "them (fresh optimizer)", metavar="DIR")
    group = parser.add_argument_group("running")
    _option(group, "--eval-k", int, "samples per example of the final evaluation (0 skips it)")
    _option(group, "--monitor-examples", int, "test examples on which each epoch's test bound is computed (all of "
            "them where the test split holds fewer)")
    _option(group, "--checkpoint-every", float, "also checkpoint every this many seconds within an epoch",
            dest="checkpoint_every_s", metavar="SECONDS")
    _option(group, "--device", str, "cpu, cuda, or auto (a GPU if there is one)")
    _option(group, "--matmul", str, "the CPU's float32 matrix-multiply path: default (torch's BLAS) or onednn; "
            "unset, the faster on the run's step, timed as it starts (a run records it: give a stack's to a lone "
            "run of one of its seeds to multiply alike)")
    _option(group, "--threads", int, "torch's threads; unset, one per CPU that other processes leave free, as "
            "measured at start, or one where a new run of 500 steps or more times its step faster on one (a run "
            "records it, and a resumed run reuses it unless given another)")
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                       help="compile the training step into one program (torch.compile; a CUDA graph on a GPU), or "
                       f"not; default: compile runs of at least {train_config.AUTO_COMPILE_STEPS:,} steps or "
                       f"{train_config.AUTO_COMPILE_SAMPLES:,} samples (steps x batch size x k x seeds)")


def _threads_option(parser: argparse.ArgumentParser, more: str = "") -> None:
    parser.add_argument("--threads", type=int, metavar="N", help="torch's threads (default: one per CPU that other "
                        f"processes leave free, as measured at start{more})")


def _evaluate_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "evaluate", help="estimate a run's NLL with k importance samples (eval*.json), or with AIS or BDMC",
        description="Evaluate a run's latest checkpoint: NLL = mean over examples of -log (1/k) sum_i w_i, the "
        "bounds L_1, L_5, L_50 and L_k, the effective sample size and the active units. The run's own evaluation "
        "(its test split, every example, seed 0, the k of its training's final evaluation, else 5000) is written "
        "to RUN/eval.json; any other setting to a file named after it, e.g. RUN/eval-test-k10-n50.json, so no "
        "evaluation replaces one of another k, split, data, examples or seed.",
    )
    parser.add_argument("run", type=_directory, help="a run directory written by iwae train")
    parser.add_argument("--k", type=int, default=5000, metavar="K", help="samples per example (default: 5000)")
    parser.add_argument("--split", metavar="SPLIT", help="test, train or valid (default: test)")
    parser.add_argument("--dataset", metavar="NAME_OR_PATH",
                        help="evaluate on this dataset name or .npy/.npz file instead of the run's")
    parser.add_argument("--data-dir", metavar="DIR", help="where to look for dataset files (default: the run's)")
    parser.add_argument("--examples", type=int, metavar="N", help="evaluate on N examples of the split only, a "
                        "random subset that is the same for every run, method and seed (default: all for is; 100 for "
                        "ais; bdmc simulates N examples, default 100)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the samples (default: 0)")
    parser.add_argument("--chunk-size", type=int, metavar="N",
                        help=f"samples per pass (default: {likelihood.CHUNK_SIZE})")
    parser.add_argument("--batch-size", type=int, metavar="N", help="examples per pass (default: "
                        f"{likelihood.EXAMPLES_PER_PASS} for is, {evaluate_ais.BATCH_SIZE} for ais and bdmc)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile the evaluation passes (torch.compile), or not; default: compile evaluations of "
                        f"at least {evaluation.AUTO_COMPILE_SAMPLES:,} samples (examples times k)")
    parser.add_argument("--checkpoint-every", type=float, default=resumable.SAVE_EVERY_S, dest="save_every_s",
                        metavar="SECONDS", help="write the finished part of the evaluation this often, beside its "
                        "result; run the same command again after a kill to continue from it (default: "
                        f"{resumable.SAVE_EVERY_S:g})")
    parser.add_argument("--matmul", metavar="NAME", help="the CPU's float32 matrix-multiply path: default (torch's "
                        "BLAS) or onednn; unset, that of the evaluation being continued, else the faster on a pass, "
                        "timed as it starts")
    parser.add_argument("--no-time-limit", action="store_const", const=None, default=duration.TIME_LIMIT_S,
                        dest="time_limit_s", help="run an evaluation estimated to take longer than "
                        f"{duration.format_duration(duration.TIME_LIMIT_S)}, rather than refuse it")
    gold = parser.add_argument_group("annealed importance sampling (--method ais or bdmc)")
    gold.add_argument("--method", choices=("is", "ais", "bdmc"), default="is",
                      help="is: importance sampling (eval.json); ais: AIS and IS on the same examples "
                      f"({evaluate_ais.AIS_FILE}, or a file named after the setting); bdmc: bidirectional Monte Carlo "
                      f"on data simulated from the model ({evaluate_ais.BDMC_FILE}, likewise) (default: is)")
    gold.add_argument("--ais-steps", type=int, nargs="+", metavar="N",
                      help="intermediate distributions; several values for ais draw the estimate against them "
                      "(the largest is reported) (default: 1000)")
    gold.add_argument("--chains", type=int, metavar="C", help="AIS chains per example (default: 16)")
    gold.add_argument("--leapfrog", type=int, metavar="L", help="leapfrog steps per HMC move (default: 10)")
    gold.add_argument("--start", choices=("prior", "encoder"),
                      help="AIS starts from the prior or from q(z|x) (default: prior)")
    _threads_option(parser)


def _sample_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "sample", help="draw a run's figures: samples, reconstructions, training curves, bound against k",
        description=f"Draw the figures of a run into RUN/{rundir.FIGURES}/ from its checkpoint, metrics and "
        "evaluation.",
    )
    parser.add_argument("run", type=_directory, help="a run directory written by iwae train")
    parser.add_argument("--n", type=int, default=100, metavar="N", help="number of model samples, at least 2; half "
                        "as many test examples are reconstructed (default: 100)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the samples (default: 0)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    _threads_option(parser)


def _directory(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a directory (. for this one)")
    return Path(text)


def _int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,10,100; got {text!r}") from None


def _once_each(items: list[str] | list[int]) -> list:
    """``items`` without repeats, in their order: a setting given twice is measured once."""
    return list(dict.fromkeys(items))


def _diagnose_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("diagnose", help="gradient diagnostics: iwae diagnose snr ...",
                                 description="Diagnostics of a model's gradient estimators.")
    which = parser.add_subparsers(dest="diagnostic", metavar="DIAGNOSTIC", required=True)
    snr = which.add_parser(
        "snr", help="gradient signal-to-noise ratio of each estimator against K: snr.csv, slopes.json, "
        "slopes_se.json, snr.png, settings.json",
        description="Measure the gradient SNR of the inference and generative networks for each objective, "
        "estimator and K, on a batch of a run's training data at its checkpoint (RUN) or on the Gaussian toy of "
        "Rainforth et al. 2018 (--toy), and fit the slope of log SNR against log K.",
    )
    snr.add_argument("run", type=_directory, nargs="?", help="a run directory written by iwae train")
    snr.add_argument("--toy", action="store_true", help="use the built-in Gaussian toy (D=20) near its optimum")
    snr.add_argument("--objectives", default="iwae", metavar="LIST",
                     help=f"comma-separated, from {', '.join(snr_diagnostics.GRADIENT_OBJECTIVES)} (default: iwae)")
    snr.add_argument("--estimators", default=",".join(REPARAMETERIZED_ESTIMATORS), metavar="LIST",
                     help=f"comma-separated, from {', '.join(REPARAMETERIZED_ESTIMATORS)} (default: all)")
    snr.add_argument("--k", type=_int_list, default=[1, 10, 100, 1000], metavar="LIST",
                     help="the grid of K, total samples per example (default: 1,10,100,1000)")
    snr.add_argument("--m", type=_int_list, metavar="LIST",
                     help="the grid of M, groups for miwae and piwae; each must divide every K (default: 1)")
    snr.add_argument("--beta", type=float, help="the ELBO's weight, for ciwae (default: 0.5)")
    snr.add_argument("--draws", type=int, default=100, metavar="N",
                     help="gradient draws per pass; each setting costs 2N backward passes (default: 100)")
    snr.add_argument("--examples", type=int, metavar="N",
                     help="the batch size (default: the run's batch size; 256 for the toy)")
    snr.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the batch and samples (default: 0)")
    snr.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    snr.add_argument("--out", type=_directory, required=True, metavar="DIR", help="where to write the results")
    snr.add_argument("--no-time-limit", action="store_const", const=None, default=duration.TIME_LIMIT_S,
                     dest="time_limit_s", help="run a diagnostic estimated to take longer than "
                     f"{duration.format_duration(duration.TIME_LIMIT_S)}, rather than refuse it")
    _threads_option(snr)


def _reproduce_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "reproduce", help="train a paper's table as a grid of runs and report it beside the published numbers",
        description="Train every cell of TABLE for each seed into OUT/<cell>/seed-<s> (finished runs are skipped, "
        "unfinished ones resumed), then write OUT/report.md, OUT/report.csv and OUT/curves.png.",
    )
    parser.add_argument("table", metavar="TABLE", help=f"one of {', '.join(reproduce.GRIDS)}")
    parser.add_argument("--out", type=_directory, metavar="DIR", help="where the runs and reports go (default: TABLE)")
    parser.add_argument("--budget", type=float, default=1.0, metavar="FRACTION",
                        help="scale every stage of the paper's 3280-epoch schedule by this (default: 1)")
    parser.add_argument("--seeds", type=int, default=1, metavar="S", help="seeds 0..S-1 of every cell (default: 1)")
    parser.add_argument("--eval-k", type=int, default=5000, metavar="K",
                        help="samples per test example of each run's final evaluation (default: 5000)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    parser.add_argument("--data-dir", metavar="DIR", help="where to look for dataset files (also $IWAE_DATA_DIR)")
    parser.add_argument("--cells", nargs="+", metavar="CELL",
                        help="run and report only these cells of TABLE (with any cell one of them continues)")
    _threads_option(parser, "; under torchrun, shared by the ranks on each machine; a new cell drops to one "
                    "where its step runs faster on one, and a resumed cell runs on the count it recorded. "
                    "N, if given, is used by every cell")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="iwae", description="Importance-weighted autoencoders: train, evaluate, sample, diagnose, "
                     "reproduce.")
    parser.add_argument("--version", action="version", version=f"iwae {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _train_parser(commands)
    _evaluate_parser(commands)
    _sample_parser(commands)
    _diagnose_parser(commands)
    _reproduce_parser(commands)
    _name_options(parser)
    return parser


def _name_options(parser: argparse.ArgumentParser) -> None:
    """Give each (sub)command's parsed arguments ``options``: the option of each setting, as the user types it,
    to name it in error messages."""
    parser.set_defaults(options={a.dest: a.option_strings[0] for a in parser._actions if a.option_strings})
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                _name_options(command)


def _run_train(args: argparse.Namespace) -> dict[str, Any] | None:
    given = {name: value for name, value in vars(args).items() if name in _DEFAULTS}
    if args.out is not None and args.resume is not None:
        raise UsageError("give --out DIR or --resume DIR, not both: --out starts a new run, --resume continues one")
    if args.out is None and args.resume is None:
        raise UsageError("give --out DIR to start a new run, or --resume DIR to continue one")
    if args.resume is not None and args.seeds is not None:
        raise UsageError(f"--seeds starts a new stacked run; to continue the run in {args.resume}, drop --seeds: "
                         f"iwae train --resume {args.resume}")
    if args.resume is None:
        _check_unread_options(given)
    elif "data_dir" in given:
        _check_data_dir(_recorded(args.resume, "dataset"), "the run trains on")
    if args.seeds is not None or (args.resume is not None and stacked_run.is_stacked(args.resume)):
        return _run_train_stacked(args, given)
    if args.resume is not None:
        result = lone_run.resume(args.resume, given)
        run_dir = args.resume
    else:
        result = lone_run.train(train_config.TrainConfig(**given), args.out)
        run_dir = args.out
    if result is not None:
        print(evaluation.format_evaluation(result))
    print(f"run directory: {run_dir}   figures: {run_dir / rundir.FIGURES}/")
    return result


def _check_unread_options(given: dict[str, Any]) -> None:
    """Refuse an option that the run's objective or model does not read (e.g. --m with iwae, --layers with a
    sigmoid belief net), rather than ignore it."""
    objective = given.get("objective", _DEFAULTS["objective"])
    for name, objectives in SETTING_READERS.items():
        if name in given and objective not in objectives:
            raise UsageError(f"--{name} applies to --objective {' or '.join(objectives)} only, not {objective}; "
                             f"drop --{name}, or choose --objective {objectives[0]}")
    if "data_dir" in given:
        _check_data_dir(given.get("dataset", _DEFAULTS["dataset"]), "--dataset")
    # given at the schedule's own values too (TrainConfig refuses only other values: a recorded run holds them)
    train_config.check_schedule_reads(given.get("schedule", _DEFAULTS["schedule"]), given)
    model = given.get("model", _DEFAULTS["model"])
    if "layers" in given and model != "burda":
        raise UsageError(f"--layers applies to --model burda only, not {model}, whose layers are the widths in its "
                         "name; drop --layers")


def _check_data_dir(dataset: str | None, named: str) -> None:
    """Refuse --data-dir for ``dataset`` (``named`` so in the message; None: not known), which reads no files there."""
    if dataset is not None and not data.reads_data_dir(dataset):
        raise UsageError(f"--data-dir is where the files of mnist, omniglot and the other downloaded datasets are "
                         f"searched for; {named} {dataset}, which reads none there; drop --data-dir")


def _recorded(run: Path, setting: str) -> Any:
    """The ``setting`` (e.g. "dataset") that the run, or stack, in ``run`` records in its config.json (a stack's: its
    first seed's); None where none can be read (the resume then says why)."""
    if stacked_run.is_stacked(run):
        run = next((config.parent for config in run.glob(f"seed-*/{rundir.CONFIG}")), None)
    try:
        return rundir.read_config(run).get(setting) if run is not None else None
    except rundir.RunDirError:
        return None


def _run_train_stacked(args: argparse.Namespace, given: dict[str, Any]) -> None:
    if args.resume is not None:
        results = stacked_run.resume_stacked(args.resume, given)
        out = args.resume
    else:
        if args.seeds < 1:
            raise UsageError(f"--seeds must be a positive number of seeds; got {args.seeds}")
        config = train_config.TrainConfig(**given)
        if config.seed + args.seeds > SEED_LIMIT:
            raise UsageError(f"--seed {config.seed} with --seeds {args.seeds} takes the seeds {config.seed} to "
                             f"{config.seed + args.seeds - 1}, past 2**63 - 1; choose a --seed of at most "
                             f"{SEED_LIMIT - args.seeds}")
        # a stack too large for memory even on data of one dimension is refused before its seeds' configurations
        # are made (the estimate grows with the data's dimension; the real one is checked once the data is read)
        preflight.check_training_memory(config, 1, resolve_device(config.device), seeds=args.seeds)
        configs = [dataclasses.replace(config, seed=config.seed + s) for s in range(args.seeds)]
        results = stacked_run.train_stacked(configs, args.out)
        out = args.out
    for seed, result in zip(rundir.read_json(out / stacked_run.STACK)["seeds"], results, strict=True):
        if result is not None:
            print(f"seed-{seed}: NLL {result['nll']:.2f} +- {result['nll_se']:.2f} nats (k={result['k']})")
    print(f"run directories: {out}/seed-*")


# the library's names of settings that the command line names otherwise (by their names in ``args``)
_AIS_OPTIONS = {"steps": "ais_steps", "n": "examples"}
_SNR_OPTIONS = {"ks": "k", "objective": "objectives", "estimator": "estimators"}
# the options of --method ais and bdmc alone (unset: the library's defaults), by their names in ``args``
_AIS_ONLY = {"ais_steps": "steps", "chains": "chains", "leapfrog": "leapfrog", "start": "start"}
# the options of importance sampling alone, and those of the run's data (bdmc simulates its own), unset by default
_IS_ONLY = ("chunk_size", "compile", "matmul")
_DATA = ("split", "dataset", "data_dir")


def _run_evaluate_ais(args: argparse.Namespace) -> None:
    use_threads(args.threads)
    with _named_as(_AIS_OPTIONS):
        _evaluate_ais(args)


@contextlib.contextmanager
def _named_as(options: dict[str, str]) -> Iterator[None]:
    """Raise a SettingError of the library's with its settings renamed by ``options`` (the library's name: the name
    in ``args``), so that ``main`` names the options as typed (--ais-steps, not steps)."""
    try:
        yield
    except SettingError as error:
        raise SettingError(error.template, tuple(options.get(name, name) for name in error.names),
                           **error.values) from None


def _evaluate_ais(args: argparse.Namespace) -> None:
    for name, setting in _AIS_ONLY.items():
        if getattr(args, name) is None:
            default = evaluate_ais.DEFAULTS[setting]
            setattr(args, name, [default] if name == "ais_steps" else default)
    examples = evaluate_ais.DEFAULT_EXAMPLES if args.examples is None else args.examples  # 0 is refused, not replaced
    settings = dict(chains=args.chains, leapfrog=args.leapfrog, start=args.start, k=args.k, examples=examples,
                    device=args.device, seed=args.seed, batch_size=args.batch_size, progress=True,
                    time_limit_s=args.time_limit_s, save_every_s=args.save_every_s)
    if args.method == "ais":
        result = evaluate_ais.evaluate_ais(args.run, steps=args.ais_steps, split=args.split, dataset=args.dataset,
                                           data_dir=args.data_dir, **settings)
    elif len(args.ais_steps) > 1:
        raise UsageError("bdmc runs one number of --ais-steps; give one value")
    else:
        result = evaluate_ais.evaluate_bdmc(args.run, steps=args.ais_steps[0], **settings)
    print(evaluate_ais.format_ais_table(result))
    print(f"written to {result['path']}")


def _run_evaluate(args: argparse.Namespace) -> None:
    if not args.save_every_s >= 0:
        raise UsageError(f"--checkpoint-every must be a number of seconds >= 0; got {args.save_every_s}")
    # stopped, it keeps its finished batches, and the same command (``main`` names it) continues from them
    with signals.raising_on_signal("the evaluation (its finished batches kept)", "the same command"):
        given = [name for name in _AIS_ONLY if getattr(args, name) is not None]
        if args.method == "is" and given:
            options = ", ".join("--" + name.replace("_", "-") for name in given)
            verb, them = ("applies", "it") if len(given) == 1 else ("apply", "them")
            raise UsageError(f"{options} {verb} to --method ais or bdmc, not to importance sampling; drop {them}, "
                             "or choose --method ais or bdmc")
        if args.method != "is":
            _refuse_unread_by_ais(args)
        if args.data_dir is not None:
            _check_data_dir(args.dataset or _recorded(args.run, "dataset"),
                            "--dataset" if args.dataset else "the run was trained on")
        args.split = "test" if args.split is None else args.split
        args.chunk_size = likelihood.CHUNK_SIZE if args.chunk_size is None else args.chunk_size
        if args.batch_size is None:
            args.batch_size = likelihood.EXAMPLES_PER_PASS if args.method == "is" else evaluate_ais.BATCH_SIZE
        if args.method != "is":
            _run_evaluate_ais(args)
        else:
            _evaluate_by_importance_sampling(args)


def _refuse_unread_by_ais(args: argparse.Namespace) -> None:
    """Refuse the options of importance sampling alone given to --method ais or bdmc, and those of the run's data
    given to bdmc (which simulates its examples), rather than ignore them."""
    names = (*_IS_ONLY, *(_DATA if args.method == "bdmc" else ()))
    unread = [name for name in names if getattr(args, name) is not None]
    if unread:
        options = ", ".join("--" + name.replace("_", "-") for name in unread)
        simulated = " (which simulates its examples from the model)" if args.method == "bdmc" else ""
        verb, them = ("does", "it") if len(unread) == 1 else ("do", "them")
        raise UsageError(f"{options} {verb} not apply to --method {args.method}{simulated}; drop {them}")


def _evaluate_by_importance_sampling(args: argparse.Namespace) -> None:
    result = evaluation.evaluate_run(
        args.run, k=args.k, split=args.split, dataset=args.dataset, data_dir=args.data_dir, examples=args.examples,
        device=args.device, seed=args.seed, chunk_size=args.chunk_size, batch_size=args.batch_size, progress=True,
        compile=args.compile, save_every_s=args.save_every_s, time_limit_s=args.time_limit_s, matmul=args.matmul,
        threads=args.threads,
    )
    print(evaluation.format_evaluation(result))
    print(f"written to {result['path']}")


def _run_sample(args: argparse.Namespace) -> None:
    use_threads(args.threads)
    for path in run_figures.make_figures(args.run, device=args.device, seed=args.seed, n=args.n):
        print(path)


def _run_diagnose(args: argparse.Namespace) -> None:
    if (args.run is None) == (not args.toy):
        raise UsageError("give a run directory RUN, or --toy for the built-in Gaussian toy (not both)")
    if args.toy and args.device not in ("auto", "cpu"):
        raise UsageError(f"the Gaussian toy (--toy) is diagnosed on the CPU; drop --device {args.device}")
    if args.examples is not None and args.examples < 1:
        raise UsageError(f"--examples must be a positive number; got {args.examples}")
    check_seed(args.seed)
    rundir.check_writable(args.out)
    use_threads(args.threads)
    objectives, estimators = _once_each(args.objectives.split(",")), _once_each(args.estimators.split(","))
    for option, readers in SETTING_READERS.items():
        if getattr(args, option, None) is not None and not set(objectives) & set(readers):
            raise UsageError(f"--{option} is read by {' and '.join(readers)} only, and --objectives has neither; drop "
                             f"--{option}, or add {readers[0]} to --objectives")
    args.m, args.beta = _once_each(args.m or [1]), 0.5 if args.beta is None else args.beta
    settings = [(objective, m) for objective in objectives
                for m in (args.m if objective in SETTING_READERS["m"] else [1])]  # M groups matter to these only
    for objective, m in settings:  # every setting is checked before any work is done
        with _named_as(_SNR_OPTIONS):
            snr_diagnostics.check_settings(objective, estimators, args.k, args.draws, m=m, beta=args.beta)
    if args.toy:
        toy = GaussianToy()  # its dimension's parameters only, to estimate the memory before drawing the data
        snr_diagnostics.check_snr_memory(toy, toy.mu.numel(), args.examples or 256, args.k, resolve_device("cpu"))
        x = GaussianToy.sample_data(args.examples or 256, seed=args.seed)
        model, title = GaussianToy.near_optimum(x, seed=args.seed), "Gaussian toy"
    else:
        device = resolve_device(args.device)
        state, model = checkpoint.load_model(args.run, device)
        config = state["config"]
        if config.get("model", "burda") != "burda":
            raise UsageError(f"{args.run}'s model ({config['model']}) has discrete latents, which the reparameterized "
                             "estimators measured here cannot train; diagnose a run of the burda model, or --toy")
        loaded = data.load(config["dataset"], config["data_dir"], split=config["data_split"],
                           sha256=config.get("dataset_sha256")).to(device)
        if args.examples is not None and args.examples > len(loaded.train):
            raise UsageError(f"--examples {args.examples} is more than the {len(loaded.train)} training examples of "
                             f"{loaded.name}; give at most {len(loaded.train)}")
        x = splits.split_examples(loaded, "train", args.seed, args.examples or config["batch_size"])
        snr_diagnostics.check_snr_memory(model, x.shape[1], len(x), args.k, device)
        title = f"{args.run.name} (epoch {state['epoch']}, a batch of {len(x)})"
    snr_diagnostics.check_snr_time(model, x, settings, estimators, args.k, args.draws, beta=args.beta,
                                   limit_s=args.time_limit_s)
    if len(set(args.k)) < 2:
        print("iwae: one K in --k: the SNR at it is measured, and no slope against K fitted (give two or more K)",
              file=sys.stderr)
    results = [
        snr_diagnostics.gradient_snr(model, x, objective, estimators, args.k, args.draws, seed=args.seed, progress=True,
                                     **snr_diagnostics.read_by(objective, m=m, beta=args.beta))
        for objective, m in settings
    ]
    print(snr_diagnostics.format_snr_table(results))
    settings = {"run": None if args.toy else str(args.run), "examples": len(x), "seed": args.seed, "draws": args.draws,
                "objectives": objectives, "estimators": estimators, "k": sorted(set(args.k)),
                "m": args.m if set(objectives) & set(SETTING_READERS["m"]) else None,
                "beta": args.beta if set(objectives) & set(SETTING_READERS["beta"]) else None}
    for path in snr_report.write_results(results, args.out, title, settings):
        print(path)


def _run_reproduce(args: argparse.Namespace) -> None:
    options = reproduce.Options(budget=args.budget, seeds=args.seeds, eval_k=args.eval_k, device=args.device,
                                data_dir=args.data_dir, cells=None if args.cells is None else tuple(args.cells),
                                threads=args.threads)
    paths = reproduce.run_table(args.table, args.out or Path(args.table), options)
    for path in paths.values():
        print(path)


def _check_command(args: argparse.Namespace) -> None:
    """Refuse a --data-dir that is not a directory, and, under torchrun, the commands that run in one process only."""
    data_dir = getattr(args, "data_dir", None)
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise UsageError(f"--data-dir {data_dir} is not a directory; give the folder that holds the dataset's files "
                         "(or its mnist/, omniglot/, ... folders), or drop it to search $IWAE_DATA_DIR and the cache")
    if not distributed.launched():
        return
    device = getattr(args, "device", None) or ""
    if device.startswith("cuda:"):
        raise UsageError(f"--device {device} under torchrun: each rank runs on its own GPU, LOCAL_RANK; give "
                         "--device cuda")
    alone = {"sample": "iwae sample", "diagnose": "iwae diagnose"}.get(args.command)
    if args.command == "evaluate" and args.method != "is":
        alone = f"iwae evaluate --method {args.method}"
    if args.command == "train" and (args.seeds is not None or (args.resume is not None and
                                                               stacked_run.is_stacked(args.resume))):
        alone = "stacked seeds (iwae train --seeds)"
    if alone is not None:
        raise UsageError(f"{alone} runs in one process, not under torchrun; run it without torchrun (iwae reproduce "
                         "spreads seeds and cells over ranks)")


def _continued(stop: signals.Interrupted, command: str, argv: list[str]) -> signals.Interrupted:
    """``stop`` of ``command``, named with the command line that continues it: the same one for a grid's cells or
    an evaluation (under torchrun with as many ranks, for an evaluation, whose ranks keep their own batches)."""
    if command not in ("reproduce", "evaluate"):
        return stop
    return stop.continued_by(_again(command, argv))


def _again(command: str, argv: list[str]) -> str:
    """The command line that continues ``command`` (run as ``argv``) where it stopped: the same one for a grid or
    an evaluation (under torchrun with as many ranks, for an evaluation, whose ranks keep their own batches)."""
    again = f"iwae {shlex.join(argv)}"
    if command == "evaluate" and distributed.launched():
        again = f"{again}, under torchrun with {distributed.launched_ranks()} ranks again"
    return again


def _stopped_as_said(command: str) -> contextlib.AbstractContextManager[None]:
    """For the commands that keep no work when stopped (a diagnosis, drawing figures), SIGTERM as SIGINT: a message
    saying what stopped and that the same command does it again, rather than an end without a word."""
    what = {"diagnose": "the diagnosis (nothing kept)", "sample": "drawing the figures (those finished kept)"}
    if command not in what:
        return contextlib.nullcontext()
    return signals.raising_on_signal(what[command], "the same command", "run it again with")


def _session(args: argparse.Namespace, argv: list[str]) -> contextlib.AbstractContextManager[None]:
    """The torchrun session of the command ``args``: its ranks meet on gloo where they only wait for each other (a
    grid) or compute on the CPU, and a lost rank's message names the command line that continues the work."""
    device = getattr(args, "device", None)
    if args.command == "train" and device is None and args.resume is not None:
        device = _recorded(args.resume, "device")  # a resumed run trains where it did
    backend = "gloo" if args.command == "reproduce" or device == "cpu" else None
    again = _again(args.command, argv)
    if args.command == "train":
        again = f"iwae train --resume {args.resume or args.out}, under torchrun"
    return distributed.session(backend, again)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    heap.retain_freed_memory()
    options: dict[str, str] = {}
    command = None
    try:
        args = build_parser().parse_args(argv)
        options, command = args.options, args.command
        _check_command(args)
        with _session(args, sys.argv[1:] if argv is None else argv), _stopped_as_said(args.command):
            try:
                {"train": _run_train, "evaluate": _run_evaluate, "sample": _run_sample, "diagnose": _run_diagnose,
                 "reproduce": _run_reproduce}[args.command](args)
            except signals.Interrupted as stop:
                raise _continued(stop, command, sys.argv[1:] if argv is None else argv) from None
    except signals.Interrupted as stop:
        print(f"iwae: {stop}", file=sys.stderr)
        return 128 + stop.signal
    except KeyboardInterrupt:
        print("iwae: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, FloatingPointError) as error:
        message = error.message(lambda name: options.get(name, name)) if isinstance(error, SettingError) else error
        print(f"iwae: error: {' '.join(str(message).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
