"""Trains a small policy with GRPO on a task a program can check, every log-probability and
entropy from the fused head (softmax_jax.linear_log_probs).

The task: reverse a prompt of --length symbols (reward: the fraction of positions right).
The policy is the next-token model of train_lm.py over the task's tokens. A short supervised
warm-up gives it some reward; the warmed-up policy is then frozen as the reference, and
each GRPO step samples --group completions of --prompts prompts, normalises the rewards
within each group, and updates on the clipped ratio objective with a k3 KL penalty to the
reference and an entropy bonus. Held-out prompts (never trained on) are evaluated at the
start, every --eval-every steps and at the end.

Examples:

    python scripts/train_grpo.py                       # about 2 minutes on 2 CPU cores
    python scripts/train_grpo.py --steps 400 --resume  # continue runs/grpo to step 400
    python scripts/train_grpo.py --symbols 63 --overwrite

Writes DIR/metrics.json (settings, warm-up losses, per-step training reward, loss, KL and
entropy, the held-out evaluations, and the compiled temporaries of one GRPO update, fused
and on materialised logits), DIR/reward.png and DIR/checkpoint.npz (rewritten atomically at
every evaluation). A folder that already holds a run is refused unless --resume or
--overwrite says what to do with it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from experiments import cli

RUN_FILES = ("checkpoint.npz", "metrics.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.script_parser("train_grpo.py", __doc__)
    task = parser.add_argument_group("task and model")
    task.add_argument("--symbols", type=int, default=31, help="distinct symbols (default 31)")
    task.add_argument("--length", type=int, default=4, help="prompt length (default 4)")
    task.add_argument("--embed", type=int, default=32, help="embedding width (default 32)")
    task.add_argument("--hidden", type=int, default=128, help="hidden width (default 128)")
    train = parser.add_argument_group("training")
    train.add_argument("--warmup-steps", type=int, default=40,
                       help="supervised warm-up steps (default 40)")
    train.add_argument("--steps", type=int, default=200, help="GRPO steps (default 200)")
    train.add_argument("--prompts", type=int, default=32, help="prompts per step (default 32)")
    train.add_argument("--group", type=int, default=8,
                       help="completions per prompt (default 8)")
    train.add_argument("--updates", type=int, default=2,
                       help="updates per sampled batch (default 2)")
    train.add_argument("--lr", type=float, default=2e-3, help="GRPO Adam rate (default 2e-3)")
    train.add_argument("--clip", type=float, default=0.2, help="ratio clip (default 0.2)")
    train.add_argument("--kl-weight", type=float, default=0.04, help="default 0.04")
    train.add_argument("--entropy-weight", type=float, default=0.01, help="default 0.01")
    train.add_argument("--seed", type=int, default=0, help="default 0")
    run = parser.add_argument_group("run")
    run.add_argument("--eval-every", type=int, default=25,
                     help="held-out evaluation interval in steps (default 25)")
    run.add_argument("--eval-prompts", type=int, default=1024,
                     help="held-out prompts (default 1024)")
    run.add_argument("--out", type=Path, default=Path("runs/grpo"), help="default runs/grpo")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    cli.add_resume_arguments(run, "--steps")
    return parser.parse_args(argv)


def _config(args: argparse.Namespace):
    from experiments import grpo

    cfg = grpo.GRPOConfig(
        symbols=args.symbols, length=args.length, embed_dim=args.embed, hidden=args.hidden,
        warmup_steps=args.warmup_steps, steps=args.steps, prompts=args.prompts,
        group=args.group, updates=args.updates, learning_rate=args.lr, clip=args.clip,
        kl_weight=args.kl_weight, entropy_weight=args.entropy_weight,
        eval_every=args.eval_every, eval_prompts=args.eval_prompts, seed=args.seed)
    cli.claim_run_folder(args.out, RUN_FILES, resume=args.resume, overwrite=args.overwrite)
    return cfg


def run(args: argparse.Namespace, cfg, progress: bool, log) -> str:
    """Trains (or resumes), writes the outputs; returns the closing lines."""
    import jax

    from experiments import grpo
    from experiments.checkpoint import atomic_write_json

    log(f"{jax.default_backend()} backend; vocabulary {cfg.task.vocab_size}, head"
        f" {cfg.hidden} x {cfg.task.vocab_size}, {cfg.prompts} prompts x {cfg.group}"
        f" completions per step")
    result = grpo.train(cfg, out_dir=args.out, resume=args.resume, progress=progress, log=log)
    memory = grpo.step_memory(cfg)
    atomic_write_json(args.out / "metrics.json",
                      result.summary() | {"step_memory": memory,
                                          "backend": jax.default_backend()})
    grpo.plot_rewards(result, args.out / "reward.png")
    start, end = result.evals[0], result.evals[-1]
    return (
        f"held-out reward {start['reward']:.3f} +- {start['reward_se']:.3f} (step"
        f" {start['step']}) -> {end['reward']:.3f} +- {end['reward_se']:.3f} (step"
        f" {end['step']}); KL to reference {end['kl']:.4f}, entropy {start['entropy']:.3f}"
        f" -> {end['entropy']:.3f}\none GRPO update compiles to"
        f" {memory['fused_temp_mib']:.2f} MiB of temporaries fused,"
        f" {memory['materialised_temp_mib']:.2f} MiB on materialised logits"
    )


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    cli.start_devices("train_grpo.py", ["matplotlib", "tqdm"], None)
    from experiments import grpo
    from experiments.checkpoint import CheckpointError

    try:
        cfg = _config(args)
    except ValueError as exc:
        return cli.fail("train_grpo.py", exc, 2)
    progress, log = cli.progress_log(args.no_progress)
    try:
        report = run(args, cfg, progress, log)
    except CheckpointError as exc:
        return cli.fail("train_grpo.py", exc, 1)
    except OSError as exc:
        return cli.output_error("train_grpo.py", exc, args.out)
    except KeyboardInterrupt:
        step = grpo.saved_step(args.out / grpo.CHECKPOINT_NAME)
        saved = (f"step {step} is saved in {args.out / grpo.CHECKPOINT_NAME}"
                 if step is not None else "nothing was saved yet")
        print(f"\ntrain_grpo.py: interrupted; {saved}; continue with:"
              f" {cli.resume_command('train_grpo.py', argv)}", file=sys.stderr)
        return 130
    print(report)
    elapsed = time.perf_counter() - start
    print(f"wrote {args.out}/metrics.json, reward.png and checkpoint.npz;"
          f" done in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
