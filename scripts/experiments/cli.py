"""Command-line pieces shared by the scripts, defined once so they cannot drift.

* :func:`script_parser`: the parser of a training script, its docstring as the help.
* :func:`fail`: the one ``error:`` line of a failed run and its exit status.
* :func:`require_extras` and :func:`start_devices`: the start-up check that the ``scripts``
  extra is installed, and the simulated CPU devices asked for before JAX starts.
* :func:`add_resume_arguments` and :func:`claim_run_folder`: ``--resume`` / ``--overwrite``
  and the refusal to start a fresh run over an existing one (every training script;
  ``train_retrieval.py`` has ``--overwrite`` alone, its trainer keeps no checkpoint).
* :class:`UsageError`: a setting that cannot run, found after argparse (exit status 2).
* :func:`progress_log`, :func:`step_bar` and :func:`output_error`: whether to show a progress
  bar and how to log beside it, the training loops' bar over their steps, and the one-line
  report of an output that could not be written.
* :func:`add_split_arguments`: ``--max-files`` and ``--heldout-every``, the flags of
  :func:`experiments.sources.split_files` (every stdlib experiment).
* :func:`add_run_arguments` and :func:`check_common_arguments`: the "run" flags of the
  language-model scripts.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from experiments.sources import check_split

#: The install command of the scripts' optional dependencies.
SCRIPTS_INSTALL = "pip install 'softmax_jax[scripts]'"

#: import name -> distribution name, for the message.
_DISTRIBUTIONS = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm"}


def script_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the first paragraph of the script's docstring ``doc``
    and whose epilog is the rest (examples, outputs), kept as written."""
    paragraphs = doc.split("\n\n")
    return argparse.ArgumentParser(prog=prog, description=paragraphs[0],
                                   epilog="\n\n".join(paragraphs[1:]),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_split_arguments(group: argparse._ArgumentGroup, heldout_every: int) -> None:
    """``--max-files`` and ``--heldout-every`` (default ``heldout_every``): which stdlib
    files are read and which are held out."""
    group.add_argument("--max-files", type=int, default=None,
                       help="use this many stdlib files, evenly spaced (default: all)")
    group.add_argument("--heldout-every", type=int, default=heldout_every,
                       help=f"hold out every N-th file (default {heldout_every})")


def fail(prog: str, problem: object, status: int) -> int:
    """Prints the one ``prog: error: problem`` line of a failed run (argparse's format) and
    returns the exit ``status``: 2 for a usage error, 1 for a failure of the work."""
    print(f"{prog}: error: {problem}", file=sys.stderr)
    return status


def require_extras(prog: str, modules: Sequence[str]) -> None:
    """Exits with status 1 and one ``error:`` line naming the install command when one of
    ``modules`` cannot be imported; called at start-up, before any work is done."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            name = _DISTRIBUTIONS.get(module, module)
            raise SystemExit(fail(prog, f"{name} is not installed ({exc}); the scripts need"
                                        f" their extras: {SCRIPTS_INSTALL}", 1)) from None


def add_resume_arguments(group: argparse._ArgumentGroup, until: str | None) -> None:
    """``--resume`` (continue the run in ``--out`` up to ``until``) and ``--overwrite``
    (start over), mutually exclusive; ``--overwrite`` alone when ``until`` is None (a script
    that cannot resume)."""
    either = group.add_mutually_exclusive_group()
    if until is not None:
        either.add_argument("--resume", action="store_true",
                            help=f"continue the run in --out up to {until}")
    either.add_argument("--overwrite", action="store_true",
                        help="start over, replacing the run in --out")


class UsageError(ValueError):
    """A setting that cannot run, found after argparse has accepted the flags: the scripts
    print its one ``error:`` line and exit with status 2, as argparse does."""


def claim_run_folder(out: Path, run_files: Sequence[str], *, overwrite: bool,
                     resume: bool | None = None) -> None:
    """Raises :class:`UsageError` for a fresh run over an existing one.

    ``run_files`` are the paths, relative to ``out``, whose presence means a run is there.
    With ``resume`` the run is continued by the script (None: the script cannot resume, and
    the message offers ``--overwrite`` alone); with ``overwrite`` those files are removed
    now, so nothing of the old run (a later phase's checkpoint, say) can be mistaken for the
    new one's. Call it after every other check of the flags, so that a typo keeps the old
    run.
    """
    found = [name for name in run_files if (out / name).exists()]
    if not found or resume:
        return
    if not overwrite:
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        fix = ("pass --overwrite to start over" if resume is None
               else "pass --resume to continue it or --overwrite to start over")
        raise UsageError(f"{out} already holds a run ({found[0]}{more}); {fix}")
    for name in found:
        (out / name).unlink()


def start_devices(prog: str, extras: Sequence[str], devices: int | None) -> None:
    """The start of a JAX script, in the order it needs: the extras checked
    (:func:`require_extras`), then ``devices`` CPU devices asked for (when a positive count)
    before JAX starts its CPU backend."""
    require_extras(prog, extras)
    if devices is not None and devices >= 1:
        from experiments.lm import simulate_host_devices

        simulate_host_devices(devices)


def progress_log(no_progress: bool) -> tuple[bool, Callable[[str], object]]:
    """``(progress, log)``: a progress bar only on a terminal (and not with
    ``--no-progress``), and a ``log`` that prints above the bar instead of through it."""
    progress = not no_progress and sys.stderr.isatty()
    if not progress:
        return False, print
    from tqdm.auto import tqdm

    return True, tqdm.write


def step_bar(steps: Iterable[int], desc: str, done: int = 0, total: int = 0) -> Any:
    """A ``tqdm`` bar over the training ``steps``, starting at ``done`` of ``total`` (a resumed
    run's bar starts where the run left off)."""
    from tqdm.auto import tqdm

    return tqdm(steps, desc=desc, unit="step", dynamic_ncols=True, initial=done,
                total=max(total, done))


def output_error(prog: str, exc: OSError, out: Path) -> int:
    """Reports an output that could not be written (no space, no permission, a file where a
    folder should be) as one ``error:`` line naming the path; returns the exit status 1."""
    where = exc.filename if exc.filename is not None else out
    return fail(prog, f"{where}: {exc.strerror or exc}", 1)


def resume_command(prog: str, argv: Sequence[str] | None) -> str:
    """The command that continues an interrupted run: its own flags, with ``--resume`` in
    place of ``--overwrite``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    script = sys.argv[0] if Path(sys.argv[0]).name == prog else f"scripts/{prog}"
    kept = [a for a in argv if a not in ("--resume", "--overwrite")]
    return shlex.join(["python", script, *kept, "--resume"])


#: ``--devices`` of the language-model scripts.
DATA_PARALLEL = "data-parallel devices (default: all); on CPU this many host devices are simulated"


def data_mesh(devices: int | None, batch_size: int) -> Any:
    """The language models' ``("data",)`` mesh over ``devices`` (None: all local devices);
    raises :class:`UsageError` when it cannot split ``--batch-size`` evenly, and ValueError
    (from :func:`experiments.lm.make_mesh`) for more devices than there are."""
    from experiments import lm

    mesh = lm.make_mesh(devices)
    if batch_size % mesh.size:
        raise UsageError(f"--batch-size {batch_size} must be divisible by the {mesh.size}"
                         " devices")
    return mesh


def add_run_arguments(
    parser: argparse.ArgumentParser, *, out: Path, devices: str = DATA_PARALLEL,
    eval_positions: int | None = None, final_eval_positions: int | None = None,
) -> argparse._ArgumentGroup:
    """Adds the "run" group (``--devices`` with the help text ``devices``, the evaluation
    interval, with ``eval_positions`` the evaluation sizes, the output folder, the progress
    bar) with the given defaults and returns it, for a script to add its own run flags."""
    run = parser.add_argument_group("run")
    run.add_argument("--devices", type=int, default=None, help=devices)
    run.add_argument("--eval-every", type=int, default=50,
                     help="held-out evaluation interval in steps (default 50)")
    if eval_positions is not None:
        run.add_argument("--eval-positions", type=int, default=eval_positions,
                         help="held-out positions per interval evaluation"
                              f" (default {eval_positions})")
    if final_eval_positions is not None:
        run.add_argument("--final-eval-positions", type=int, default=final_eval_positions,
                         help="held-out positions for the final perplexities"
                              f" (default {final_eval_positions})")
    run.add_argument("--out", type=Path, default=out, help=f"default {out}")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return run


def check_common_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors (``parser.error``) for the data and run flags both scripts share."""
    if args.devices is not None and args.devices < 1:
        parser.error(f"--devices must be positive, got {args.devices}")
    try:
        check_split(args.max_files, args.heldout_every, ("--max-files", "--heldout-every"))
    except ValueError as exc:
        parser.error(str(exc))
    if args.devices is not None and args.batch_size % args.devices:
        parser.error(
            f"--batch-size {args.batch_size} must be divisible by --devices {args.devices}"
        )
