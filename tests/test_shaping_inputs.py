"""Reward transforms that cost the score phase a model pass (`rlhf_jax.train.shaping_inputs`):
the reference answer's log-probs after each completion and the prompt-free log-probs,
against explicit unpadded passes and float64 numpy; the transforms' columns; named errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.rewards import transforms
from rlhf_jax.train import online, phases, shaping_inputs
from test_online import EOS, prompts, setup


@pytest.fixture(scope="module")
def rolled():
  model, _, sc, _, _, state = setup()
  batch = {k: jnp.asarray(v) for k, v in prompts(n=3, seed=4).items()}
  batch["answer_mask"] = batch["answer_mask"].at[1, 1].set(False)  # a one-token answer
  ro = phases.rollout(model, state.params, batch, jax.random.PRNGKey(3), sc)
  return model, state.params, batch, ro


def _rows_logps(model, params, seqs):
  """Token log-probs of unpadded sequences, right-padded into one batch (float64, a list)."""
  width = max(len(q) for q in seqs)
  ids = np.zeros((len(seqs), width), np.int32)
  mask = np.zeros((len(seqs), width), np.int32)
  for i, q in enumerate(seqs):
    ids[i, :len(q)], mask[i, :len(q)] = q, 1
  lp, _ = models.token_logps(model, params, jnp.asarray(ids), jnp.asarray(mask))
  return [np.asarray(lp[i, :len(q)], np.float64) for i, q in enumerate(seqs)]


def test_answer_logps_equal_an_unpadded_pass_and_the_transform_is_their_mean(rolled):
  model, params, batch, ro = rolled
  g = 4
  lp, mask = shaping_inputs.answer_logps(model, params, ro, batch, group_size=g,
                                         eos_ids=(EOS,))
  lp, mask = np.asarray(lp, np.float64), np.asarray(mask)
  pid, pm = np.asarray(ro.prompt_ids), np.asarray(ro.prompt_mask, bool)
  cid, cm = np.asarray(ro.completion_ids), np.asarray(ro.completion_mask, bool)
  aid, am = np.asarray(batch["answer_ids"]), np.asarray(batch["answer_mask"], bool)
  saw_eos = False
  seqs, answers = [], []
  for n in range(cid.shape[0]):
    keep = cm[n] & (cid[n] != EOS)
    saw_eos |= bool(np.any(cm[n] & (cid[n] == EOS)))
    answers.append(list(aid[n // g][am[n // g]]) + [EOS])
    seqs.append(list(pid[n][pm[n]]) + list(cid[n][keep]) + answers[-1])
  for n, full in enumerate(_rows_logps(model, params, seqs)):
    assert mask[n].sum() == len(answers[n])
    np.testing.assert_allclose(lp[n][mask[n] > 0], full[-len(answers[n]):], atol=2e-5)
    assert np.all(lp[n][mask[n] == 0] == 0)
  assert saw_eos  # some completion's own EOS was dropped before the answer
  each = jnp.ones((cid.shape[0], 2))
  out = transforms.get("reference_logprob")(each, answer_logps=jnp.asarray(lp),
                                            answer_mask=jnp.asarray(mask))
  assert out.shape == (cid.shape[0], 3)
  np.testing.assert_allclose(np.asarray(out[:, 2], np.float64),
                             (lp * mask).sum(1) / mask.sum(1), rtol=1e-5)
  summed = transforms.get("reference_logprob")(each, answer_logps=jnp.asarray(lp),
                                               answer_mask=jnp.asarray(mask), normalize=False)
  np.testing.assert_allclose(np.asarray(summed[:, 2]), (lp * mask).sum(1), rtol=1e-5)


def test_sar_matches_float64_relative_perplexity(rolled):
  model, params, _, ro = rolled
  free = np.asarray(shaping_inputs.prompt_free_logps(model, params, ro), np.float64)
  cid, cm = np.asarray(ro.completion_ids), np.asarray(ro.completion_mask, bool)
  cond = np.asarray(ro.logps, np.float64)
  want = []
  lengths = [int(cm[n].sum()) for n in range(cid.shape[0])]
  alone = _rows_logps(model, params, [list(cid[n, :k]) for n, k in enumerate(lengths)])
  for n, k in enumerate(lengths):
    np.testing.assert_allclose(free[n, 1:k], alone[n][1:], atol=2e-5)
    if k < 2:
      want.append(0.0)
      continue
    ppl_c, ppl_u = np.exp(-cond[n, 1:k].mean()), np.exp(-free[n, 1:k].mean())
    want.append((ppl_u - ppl_c) / ppl_u)
  out = transforms.get("sar")(jnp.zeros((cid.shape[0], 1)), completion_logps=ro.logps,
                              prompt_free_logps=jnp.asarray(free),
                              completion_mask=ro.completion_mask.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(out[:, 1], np.float64), want, rtol=1e-4, atol=1e-6)
  assert np.abs(np.asarray(want)).max() > 1e-4


def test_model_transforms_in_the_step_and_named_errors():
  model, settings, sc, opt, rewards, state = setup()
  shaping = ("reference_logprob", "sar")
  update = online.make_update(model, rewards, opt, settings, sc, reward_shaping=shaping)
  batch = {k: jnp.asarray(v) for k, v in prompts().items()}
  _, m = update(state, batch, jax.random.PRNGKey(0))
  assert np.isfinite(float(m["reward_mean"]))
  shp = transforms.Shaping.from_config(shaping)
  with pytest.raises(ValueError, match=r"reference_logprob.*set sampling eos_ids"):
    shaping_inputs.Needs.build(shp, sampling_config=dataclasses.replace(sc, eos_ids=()))
  with pytest.raises(ValueError, match=r"config\.env"):
    shaping_inputs.Needs.build(shp, env=object(), sampling_config=sc)
  with pytest.raises(ValueError, match=r"needs 'answer_logps'"):
    shp(jnp.zeros((2, 1)), group_size=1)
  with pytest.raises(ValueError, match=r"no answer_ids"):
    update(state, {k: v for k, v in batch.items() if not k.startswith("answer")},
           jax.random.PRNGKey(0))
