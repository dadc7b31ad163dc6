"""Distils a wider next-token model into a narrower one through the fused distillation head.

The teacher is train_lm.py's model (stdlib source, word-level tokens), trained briefly here
or loaded from a train_lm.py checkpoint. The student, narrower, is then trained twice for the
same steps, from the same initial parameters, on the same batches: once on the labels alone
(softmax_jax.linear_softmax_cross_entropy), once through softmax_jax.linear_softmax_distillation
(hard_weight * CE(labels) + (1 - hard_weight) * T^2 * KL(teacher || student), neither model's
batch x vocab logits materialised). Both are judged by held-out perplexity on the labels, and
the report says which is lower, whichever it is.

Examples:

    python scripts/distill_lm.py                              # 8k vocab, 200 steps each
    python scripts/distill_lm.py --temperature 2 --hard-weight 0
    python scripts/train_lm.py --vocab 8000 --out runs/teacher
    python scripts/distill_lm.py --teacher-checkpoint runs/teacher/checkpoint.npz
    python scripts/distill_lm.py --resume                     # continue an interrupted run

Writes DIR/metrics.json (settings, corpus statistics, the teacher's and both students'
held-out perplexities, per-step losses and evaluations), DIR/distill.png, DIR/distill.json
(the settings a resumed run must match) and one checkpoint per phase, rewritten atomically
at every evaluation: DIR/teacher/checkpoint.npz when the teacher is trained here (reusable
with --teacher-checkpoint), DIR/hard/ and DIR/distilled/checkpoint.npz. --resume continues
phase by phase; a folder that already holds a run is refused without --resume or --overwrite.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments import cli

#: What an earlier run leaves in --out (the phases' folders are lm.distill.PHASES').
RUN_FILES = ("metrics.json", "distill.json", "teacher/checkpoint.npz", "hard/checkpoint.npz",
             "distilled/checkpoint.npz")


def _add_flags(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--vocab", type=int, default=8000,
                      help="vocabulary size including <unk> (default 8000)")
    cli.add_split_arguments(data, heldout_every=20)
    train = parser.add_argument_group("training (teacher and students)")
    train.add_argument("--context", type=int, default=8, help="previous tokens seen (default 8)")
    train.add_argument("--batch-size", type=int, default=512,
                       help="tokens per step, split over the devices (default 512)")
    train.add_argument("--steps", type=int, default=200,
                       help="steps of each student (default 200)")
    train.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    train.add_argument("--seed", type=int, default=0, help="default 0")
    teacher = parser.add_argument_group("teacher")
    teacher.add_argument("--teacher-embed", type=int, default=64, help="default 64")
    teacher.add_argument("--teacher-hidden", type=int, default=256, help="default 256")
    teacher.add_argument("--teacher-steps", type=int, default=200, help="default 200")
    teacher.add_argument("--teacher-checkpoint", type=Path, default=None,
                         help="load the teacher from this train_lm.py checkpoint instead of"
                              " training one (its widths come from the file)")
    student = parser.add_argument_group("student")
    student.add_argument("--embed", type=int, default=32, help="default 32")
    student.add_argument("--hidden", type=int, default=64, help="default 64")
    distil = parser.add_argument_group("distillation")
    distil.add_argument("--temperature", type=float, default=1.0, help="T (default 1)")
    distil.add_argument("--hard-weight", type=float, default=0.5,
                        help="weight of the label cross-entropy (default 0.5)")
    distil.add_argument("--beta", type=float, default=0.0,
                        help="0: forward KL, 1: reverse KL, between: generalised JSD (default 0)")
    run = cli.add_run_arguments(parser, eval_positions=4096, final_eval_positions=32768,
                            out=Path("runs/distill"))
    cli.add_resume_arguments(run, "--steps (phase by phase)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.script_parser("distill_lm.py", __doc__)
    _add_flags(parser)
    args = parser.parse_args(argv)
    cli.check_common_arguments(parser, args)
    if args.teacher_checkpoint is not None and not args.teacher_checkpoint.is_file():
        # Before the corpus is read: that takes longer than the typo took to make.
        parser.error(f"--teacher-checkpoint {args.teacher_checkpoint}: no such file")
    try:
        args.configs = _configs(args)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def _configs(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(teacher LMConfig, student LMConfig, DistillConfig); their checks become usage errors."""
    from experiments.lm import LMConfig
    from experiments.lm.distill import DistillConfig

    shared = {
        "vocab_size": args.vocab, "context": args.context, "batch_size": args.batch_size,
        "learning_rate": args.lr, "seed": args.seed, "eval_every": args.eval_every,
        "eval_positions": args.eval_positions,
        "final_eval_positions": args.final_eval_positions,
    }
    teacher = LMConfig(**shared, embed_dim=args.teacher_embed, hidden=args.teacher_hidden,
                       steps=args.teacher_steps)
    student = LMConfig(**shared, embed_dim=args.embed, hidden=args.hidden, steps=args.steps)
    distill = DistillConfig(temperature=args.temperature, hard_weight=args.hard_weight,
                            beta=args.beta)
    return teacher, student, distill


def _report(summary: dict[str, Any], unigram: float) -> str:
    """The closing line: all perplexities, and which student is lower, by how much."""
    ppl = summary["heldout_perplexity"]
    hard, distilled = ppl["hard"], ppl["distilled"]
    head = (
        f"held-out perplexity: teacher {summary['teacher']['final_heldout']['perplexity']:.2f},"
        f" hard-label student {hard:.2f}, distilled student {distilled:.2f}"
        f" (unigram baseline {unigram:.2f}); "
    )
    if summary["better"] == "tie":
        return head + "the two students tie exactly"
    better = "distilled" if distilled < hard else "hard-label"
    gap = abs(hard - distilled)
    return head + (f"the {better} student is lower by {gap:.3g} ({gap / hard:.1%} of the"
                   " hard-label student's)")


def run(args: argparse.Namespace, mesh: Any, progress: bool,
        log: Callable[[str], object]) -> str:
    """Loads the corpus, distils, writes the outputs; returns the closing report line."""
    import jax

    from experiments import lm
    from experiments.checkpoint import atomic_write_json
    from experiments.lm.distill import run_distillation

    teacher_cfg, student_cfg, dcfg = args.configs
    corpus = lm.load_corpus(args.vocab, args.max_files, args.heldout_every)
    stats = corpus.describe()
    if stats["vocab_size"] < args.vocab:
        raise ValueError(f"the training text has only {stats['vocab_size'] - 1} distinct"
                         f" tokens, fewer than --vocab {args.vocab} - 1; lower --vocab")
    log(f"stdlib corpus: {stats['train_tokens']:,} training tokens, {stats['heldout_tokens']:,}"
        f" held-out; vocabulary {stats['vocab_size']:,}; {mesh.size}"
        f" {jax.default_backend()} device(s)")
    result = run_distillation(
        teacher_cfg, student_cfg, dcfg, corpus, mesh, teacher_checkpoint=args.teacher_checkpoint,
        out_dir=args.out, resume=args.resume,
        progress=progress, log=log)
    unigram = lm.unigram_perplexity(corpus)
    summary = result.summary()
    atomic_write_json(args.out / "metrics.json", summary | {
        "corpus": stats, "unigram_heldout_perplexity": unigram,
        "backend": jax.default_backend(), "devices": mesh.size,
    })
    lm.plot_distillation(
        {"hard labels": result.students["hard"], "distilled": result.students["distilled"]},
        result.teacher_final["loss"], args.out / "distill.png",
        f"student hidden {student_cfg.hidden} from teacher hidden {result.teacher_config.hidden},"
        f" T={dcfg.temperature:g}, hard weight {dcfg.hard_weight:g}")
    return _report(summary, unigram)


def _saved_phases(args: argparse.Namespace) -> str:
    """What an interrupted run leaves behind, phase by phase, for the interrupt message."""
    from experiments import lm
    from experiments.lm.distill import PHASES

    saved = []
    for folder, what in PHASES:
        step = lm.saved_step(args.out / folder / lm.CHECKPOINT_NAME)
        if step is not None:
            saved.append(f"{what} at step {step}")
    if not saved:
        return "no phase reached a checkpoint"
    return f"saved in {args.out}: " + ", ".join(saved)


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    cli.start_devices("distill_lm.py", ["matplotlib", "tqdm"], args.devices)
    from experiments import lm
    from experiments.checkpoint import CheckpointError

    try:
        mesh = cli.data_mesh(args.devices, args.batch_size)
        # Last of the checks, so that a typo keeps the old run.
        cli.claim_run_folder(args.out, RUN_FILES, resume=args.resume, overwrite=args.overwrite)
    except ValueError as exc:
        return cli.fail("distill_lm.py", exc, 2)
    progress, log = cli.progress_log(args.no_progress)
    try:
        report = run(args, mesh, progress, log)
    except (ValueError, lm.CorpusError, CheckpointError) as exc:
        return cli.fail("distill_lm.py", exc, 1)
    except OSError as exc:
        return cli.output_error("distill_lm.py", exc, args.out)
    except KeyboardInterrupt:
        print(f"\ndistill_lm.py: interrupted; {_saved_phases(args)}; continue with:"
              f" {cli.resume_command('distill_lm.py', argv)}", file=sys.stderr)
        return 130
    print(report)
    print(f"wrote {args.out}/metrics.json and distill.png;"
          f" done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
