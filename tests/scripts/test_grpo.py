"""The GRPO experiment: its task, its objective (fused against materialised logits), the loop
with its checkpoint, and scripts/train_grpo.py, all at tiny settings."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _scripts import load_script

from experiments import grpo
from experiments.grpo import loop
from experiments.lm.model import init_params

SCRIPT = "train_grpo.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = {"symbols": 7, "length": 3, "embed_dim": 8, "hidden": 16, "warmup_steps": 3,
        "warmup_batch": 16, "steps": 4, "prompts": 4, "group": 4, "updates": 1,
        "eval_every": 2, "eval_prompts": 16}
TINY_FLAGS = ["--symbols", "7", "--length", "3", "--embed", "8", "--hidden", "16",
              "--warmup-steps", "3", "--steps", "4", "--prompts", "4", "--group", "4",
              "--updates", "1", "--eval-every", "2", "--eval-prompts", "16", "--no-progress"]


def test_task_reward_contexts_and_held_out_split():
    task = grpo.ReverseTask(symbols=5, length=3)
    prompts = jnp.array([[1, 2, 3], [4, 0, 0]])
    comp = jnp.array([[3, 2, 1], [0, 4, 4]])
    np.testing.assert_allclose(task.reward(prompts, comp), [1.0, 2 / 3])  # [0, 0, 4]
    ctx = task.contexts(prompts, comp, context=4)
    assert ctx.shape == (2, 3, 4)
    np.testing.assert_array_equal(ctx[0, 0], [5, 1, 2, 3])  # padding, then the prompt
    np.testing.assert_array_equal(ctx[0, 2], [2, 3, 3, 2])  # prompt tail, completion so far
    rng = np.random.default_rng(0)
    train, held = task.prompts(rng, 200), task.prompts(rng, 50, heldout=True)
    assert not task.is_heldout(train).any() and task.is_heldout(held).all()
    assert train.shape == (200, 3) and held.max() < 5


def test_group_advantages_are_normalised_within_each_group():
    adv = grpo.group_advantages(jnp.array([1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5]), 4)
    np.testing.assert_allclose(adv[:4], [1, -1, 1, -1], rtol=1e-5)
    np.testing.assert_allclose(adv[4:], 0.0)


def _batch(cfg, seed=0):
    params = init_params(jax.random.key(seed), cfg.model)
    params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(1), a.shape),
                          params)
    prompts = jnp.asarray(cfg.task.prompts(np.random.default_rng(seed), cfg.prompts))
    collect = jax.jit(loop._collect, static_argnums=0)
    batch, _ = collect(cfg, params, params, prompts, jax.random.key(2))
    rewards = jnp.asarray(np.random.default_rng(3).random(batch.advantages.shape), jnp.float32)
    mask = jnp.ones(batch.tokens.shape, bool).at[:, 0].set(False)
    batch = batch._replace(old_logp=batch.old_logp - 0.1, ref_logp=batch.ref_logp + 0.2,
                           advantages=grpo.group_advantages(rewards, cfg.group), mask=mask)
    return params, batch


def test_fused_grpo_loss_matches_the_materialised_logits():
    cfg = grpo.GRPOConfig(**TINY)
    params, batch = _batch(cfg)
    (got, aux), dgot = jax.jit(jax.value_and_grad(grpo.grpo_loss, has_aux=True))(
        params, batch)
    (want, aux_w), dwant = jax.jit(jax.value_and_grad(grpo.materialised_grpo_loss,
                                                      has_aux=True))(params, batch)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for k in ("kl", "entropy"):
        np.testing.assert_allclose(aux[k], aux_w[k], rtol=1e-5)
    for k in dgot:
        np.testing.assert_allclose(dgot[k], dwant[k], rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(dgot["head_w"]).max()) > 1e-4


def test_step_memory_compiles_both_losses():
    mem = grpo.step_memory(grpo.GRPOConfig(**TINY))
    assert mem["fused_temp_mib"] > 0 and mem["materialised_temp_mib"] > 0


def test_config_refuses_bad_settings():
    for bad in ({"group": 1}, {"clip": 1.5}, {"learning_rate": 0.0}, {"symbols": 1},
                {"kl_weight": -1.0}, {"steps": -1}):
        with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
            grpo.GRPOConfig(**(TINY | bad))


def test_train_records_evaluations_and_resumes_to_the_same_run(tmp_path):
    cfg = grpo.GRPOConfig(**TINY)
    whole = grpo.train(cfg, out_dir=tmp_path / "whole", log=lambda _: None)
    assert [e["step"] for e in whole.evals] == [0, 2, 4]
    assert len(whole.history) == 4 and len(whole.warmup_losses) == 3
    for e in whole.evals:
        assert 0.0 <= e["reward"] <= 1.0 and e["reward_se"] > 0 and e["entropy"] > 0
    assert whole.evals[0]["kl"] == 0.0 and whole.evals[-1]["kl"] > 0
    half = grpo.GRPOConfig(**(TINY | {"steps": 2}))
    grpo.train(half, out_dir=tmp_path / "split", log=lambda _: None)
    resumed = grpo.train(cfg, out_dir=tmp_path / "split", resume=True, log=lambda _: None)
    assert resumed.history == whole.history and resumed.evals == whole.evals
    other = grpo.GRPOConfig(**(TINY | {"hidden": 8}))
    with pytest.raises(Exception, match="hidden|different model"):
        grpo.train(other, out_dir=tmp_path / "split", resume=True, log=lambda _: None)


def test_script_writes_metrics_plot_and_refuses_an_existing_run(tmp_path, capsys):
    script = load_script(SCRIPT)
    out = tmp_path / "run"
    assert script.main([*TINY_FLAGS, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "held-out reward" in printed and "MiB of temporaries" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["end"]["step"] == 4 and len(metrics["evals"]) == 3
    assert metrics["step_memory"]["materialised_temp_mib"] > 0
    assert (out / "reward.png").read_bytes()[:8] == PNG_MAGIC
    assert script.main([*TINY_FLAGS, "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert script.main([*TINY_FLAGS, "--out", str(out), "--steps", "6", "--resume"]) == 0
    assert json.loads((out / "metrics.json").read_text())["end"]["step"] == 6


@pytest.mark.parametrize("flags, message", [
    (["--group", "1"], "group"), (["--clip", "0"], "clip"), (["--lr", "-1"], "learning_rate"),
])
def test_script_bad_flags_give_one_error_line(tmp_path, capsys, flags, message):
    script = load_script(SCRIPT)
    assert script.main([*TINY_FLAGS, "--out", str(tmp_path / "r"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train_grpo.py: error:") and message in err
    assert not (tmp_path / "r").exists()
