r"""Knowledge distillation on the stdlib next-token model, through the fused distillation head.

A wider *teacher* (the model of :mod:`experiments.lm.model`, trained briefly, or
loaded from a ``train_lm.py`` checkpoint) teaches a narrower *student*. The student is trained
twice from the same initial parameters on the same batches for the same number of steps:

* ``hard``: next-token cross-entropy on the corpus labels alone, through
  :func:`softmax_jax.linear_softmax_cross_entropy` (exactly what ``train_lm.py`` does);
* ``distilled``: through :func:`softmax_jax.linear_softmax_distillation`, whose per-token loss
  is :math:`h\,\mathrm{CE}(s, y) + (1 - h)\,T^2\,\mathrm{KL}(P_t \,\|\, Q_s)` with the teacher
  distribution :math:`P_t = \mathrm{softmax}(t/T)` and the student's
  :math:`Q_s = \mathrm{softmax}(s/T)`.

Both heads are fused: neither the student's nor the teacher's ``batch x vocab`` logits are
materialised; the teacher enters as its hidden state and its output layer, and gets no
gradient. Both students are judged by the same yardstick, the held-out cross-entropy of the
corpus labels (perplexity :math:`e^{\text{loss}}`), whichever objective trained them.

With an output directory each phase keeps its own checkpoint, written atomically at every
evaluation (:data:`PHASES`: ``teacher/``, ``hard/``, ``distilled/``), and a resumed run goes
phase by phase: a finished phase is loaded, not retrained, and an interrupted one continues
from its last evaluation, bit-for-bit.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

import softmax_jax as sj
from experiments.checkpoint import CheckpointError, atomic_write_json
from experiments.checks import positive_number
from experiments.lm.checkpoint import load_params
from experiments.lm.corpus import Corpus
from experiments.lm.loop import Objective, TrainResult, evaluate, train
from experiments.lm.model import LMConfig, Params, _head_token_block, features

__all__ = [
    "PHASES",
    "SETTINGS_NAME",
    "DistillConfig",
    "DistillResult",
    "distillation_head_loss",
    "distillation_objective",
    "run_distillation",
]


#: ``(folder, description)`` of the run's phases, in order; each folder holds the phase's
#: ``checkpoint.npz`` (the teacher's only when it is trained here).
PHASES = (("teacher", "teacher"), ("hard", "hard-label student"),
          ("distilled", "distilled student"))


@dataclass(frozen=True)
class DistillConfig:
    """How the distilled student learns from the teacher.

    ``hard_weight`` mixes in the label cross-entropy (0: the teacher alone). A temperature
    above 1 softens both distributions so the student also learns the teacher's ranking of
    the unlikely tokens; the :math:`T^2` factor keeps the gradient scale independent of T.
    """

    temperature: float = 1.0
    hard_weight: float = 0.5
    beta: float = 0.0  # 0: forward KL; 1: reverse KL; between: generalised JSD

    def __post_init__(self) -> None:
        positive_number("temperature", self.temperature)
        if not 0.0 <= self.hard_weight <= 1.0:
            raise ValueError(f"hard_weight must lie in [0, 1], got {self.hard_weight}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1], got {self.beta}")


def distillation_head_loss(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array,
    teacher_x: jax.Array,
    teacher_w: jax.Array,
    teacher_b: jax.Array,
    labels: jax.Array,
    dcfg: DistillConfig,
    token_block: int | None = None,
) -> jax.Array:
    """Mean distillation loss of the student head ``x @ w + b`` against the teacher head.

    The one place the experiment calls the fused distillation loss, so that the head can be
    swapped (for the unfused composition, say) without touching the training loop.
    """
    return sj.linear_softmax_distillation(
        x,
        w,
        teacher_x,
        teacher_w,
        labels=labels,
        b=b,
        teacher_b=teacher_b,
        temperature=dcfg.temperature,
        beta=dcfg.beta,
        hard_weight=dcfg.hard_weight,
        token_block=token_block,
    )


def distillation_objective(cfg: LMConfig, dcfg: DistillConfig, mesh: Mesh) -> Objective:
    """The student's training loss for :func:`~.loop.train`; the teacher's parameters
    arrive as its ``frozen`` argument, so the jitted step takes them as an input."""
    token_block = _head_token_block(cfg, mesh, heads=2)

    def objective(params: Params, contexts: jax.Array, targets: jax.Array,
                  teacher: Params) -> jax.Array:
        teacher_x = jax.lax.stop_gradient(features(teacher, contexts))
        return distillation_head_loss(
            features(params, contexts), params["head_w"], params["head_b"],
            teacher_x, teacher["head_w"], teacher["head_b"],
            targets, dcfg, token_block,
        )

    return objective


@dataclass
class DistillResult:
    """The teacher, both students' training records, and what ``metrics.json`` holds."""

    teacher_config: LMConfig
    teacher_source: str  # "trained" or the checkpoint's path
    teacher_steps: int
    teacher_final: dict[str, float]  # held-out loss/perplexity on the students' positions
    students: dict[str, TrainResult]  # "hard" and "distilled"
    distill: DistillConfig
    seconds: float

    def summary(self) -> dict[str, Any]:
        ppl = {name: r.final["perplexity"] for name, r in self.students.items()}
        return {
            "teacher": {
                "config": dataclasses.asdict(self.teacher_config),
                "source": self.teacher_source,
                "steps": self.teacher_steps,
                "final_heldout": self.teacher_final,
            },
            "distillation": dataclasses.asdict(self.distill),
            "students": {name: r.summary() for name, r in self.students.items()},
            "heldout_perplexity": ppl,
            # An exact tie is a tie, not a win for whichever student is listed first.
            "better": "tie" if len(set(ppl.values())) == 1 else min(ppl, key=ppl.__getitem__),
            "seconds": self.seconds,
        }


def _teacher(
    teacher_cfg: LMConfig,
    corpus: Corpus,
    mesh: Mesh,
    checkpoint: str | Path | None,
    out_dir: str | Path | None,
    resume: bool,
    progress: bool,
    log: Callable[[str], object],
) -> tuple[Params, LMConfig, str, int]:
    """Loads the teacher from ``checkpoint`` (its widths come from the file), or trains it
    (or resumes it) with train_lm's loop, checkpointing in ``out_dir/teacher`` for reuse."""
    if checkpoint is not None:
        params, cfg, step = load_params(checkpoint, corpus)
        log(f"teacher: {checkpoint} (hidden {cfg.hidden}, embed {cfg.embed_dim}, {step} steps)")
        return params, cfg, str(checkpoint), step
    result = train(teacher_cfg, corpus, mesh, out_dir=_phase_dir(out_dir, "teacher"),
                   resume=resume, progress=progress, desc="teacher",
                   log=_prefixed(log, "teacher"))
    return result.params, teacher_cfg, "trained", teacher_cfg.steps


def _prefixed(log: Callable[[str], object], what: str) -> Callable[[str], object]:
    """``log`` with each line prefixed by the phase it comes from."""
    return lambda line: log(f"{what}: {line}")


def _phase_dir(out_dir: str | Path | None, phase: str) -> Path | None:
    return Path(out_dir) / phase if out_dir is not None else None


#: The file in the output directory that records what the phases were started with.
SETTINGS_NAME = "distill.json"


def _claim_settings(out_dir: str | Path | None, resume: bool, settings: dict[str, Any]) -> None:
    """Records the settings the phases' checkpoints cannot check themselves (the
    distillation's, the teacher's source); a resumed run must match them.

    Raises:
      CheckpointError: resuming a run that was started with other settings.
    """
    if out_dir is None:
        return
    path = Path(out_dir) / SETTINGS_NAME
    if resume and path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(path, f"not readable ({exc})") from exc
        if saved != settings:
            diffs = ", ".join(f"{k} {saved.get(k)!r} (now {v!r})" for k, v in settings.items()
                              if saved.get(k) != v)
            raise CheckpointError(path, f"the run was started with {diffs}; drop --resume")
        return
    atomic_write_json(path, settings)


def run_distillation(
    teacher_cfg: LMConfig,
    student_cfg: LMConfig,
    dcfg: DistillConfig,
    corpus: Corpus,
    mesh: Mesh,
    *,
    teacher_checkpoint: str | Path | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    log: Callable[[str], object] = print,
) -> DistillResult:
    """Gets a teacher, then trains ``student_cfg`` twice: on the labels, and distilled.

    ``teacher_cfg`` is ignored when ``teacher_checkpoint`` is given. The teacher must see the
    same context length and vocabulary as the student; its widths are free. With
    ``out_dir`` every phase is checkpointed in its folder of :data:`PHASES`; ``resume``
    continues each phase from its checkpoint where there is one.
    """
    start = time.perf_counter()
    _claim_settings(out_dir, resume, dataclasses.asdict(dcfg) | {
        "teacher": str(teacher_checkpoint) if teacher_checkpoint is not None
        else teacher_cfg.identity() | {"steps": teacher_cfg.steps},
    })
    params, tcfg, source, tsteps = _teacher(
        teacher_cfg, corpus, mesh, teacher_checkpoint, out_dir, resume, progress, log)
    if (tcfg.context, tcfg.vocab_size) != (student_cfg.context, student_cfg.vocab_size):
        raise ValueError(
            f"the teacher sees context {tcfg.context} over {tcfg.vocab_size} tokens, the student"
            f" context {student_cfg.context} over {student_cfg.vocab_size}; they must agree"
        )
    # The teacher judged on exactly the positions the students will be judged on.
    teacher_eval = dataclasses.replace(tcfg, batch_size=student_cfg.batch_size)
    teacher_final = evaluate(params, corpus.heldout, teacher_eval, mesh,
                             student_cfg.final_eval_positions)
    log(f"teacher: held-out perplexity {teacher_final['perplexity']:.2f}")
    objectives = {"hard": (None, None),
                  "distilled": (distillation_objective(student_cfg, dcfg, mesh), params)}
    students = {}
    for phase, what in PHASES[1:]:
        objective, frozen = objectives[phase]
        students[phase] = train(
            student_cfg, corpus, mesh, out_dir=_phase_dir(out_dir, phase), resume=resume,
            objective=objective, frozen=frozen, progress=progress, desc=what,
            log=_prefixed(log, what))
    return DistillResult(tcfg, source, tsteps, teacher_final, students, dcfg,
                         time.perf_counter() - start)
