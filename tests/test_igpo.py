"""IGPO: information-gain turn rewards (float64 reference, special cases), the step's P_k
against an explicit teacher-forced pass, and the multi-turn step with `rl.advantage=igpo`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import advantages
from rlhf_jax import models as M
from rlhf_jax.advantages import turn as turn_lib
from rlhf_jax.train import multiturn, online
from rlhf_jax.train.rl_config import RLSettings
from test_multiturn import G, MODEL, PARAMS, SAMPLING, SPEC, TOK, ScriptedEnv, _scripted, _batch


def _igpo_reference(rewards, probs, mask, group_size, gamma, eps):
  """Float64 IGPO from the paper's definitions, loop by loop."""
  n, k = mask.shape
  r = np.zeros((n, k))
  for i in range(n):
    valid = np.flatnonzero(mask[i])
    for j in valid:
      r[i, j] = rewards[i] if j == valid[-1] else probs[i, j + 1] - probs[i, j]
  adv = np.zeros((n, k))
  for g0 in range(0, n, group_size):
    rows = range(g0, g0 + group_size)
    vals = np.array([r[i, j] for i in rows for j in np.flatnonzero(mask[i])])
    mu, sd = vals.mean(), vals.std()
    for i in rows:
      valid = np.flatnonzero(mask[i])
      normed = (r[i] - mu) / (sd + eps)
      for j in valid:
        adv[i, j] = sum(gamma ** (l - j) * normed[l] for l in valid if l >= j)
  return adv


@pytest.mark.parametrize("gamma", [1.0, 0.8])
def test_igpo_matches_a_float64_reference(gamma):
  rng = np.random.default_rng(0)
  n, k, g = 8, 4, 4
  turns = np.array([1, 4, 2, 3, 4, 1, 2, 3])
  mask = np.arange(k)[None] < turns[:, None]
  rewards = rng.integers(0, 2, n).astype(np.float64)
  probs = rng.uniform(0, 1, (n, k + 1))
  got = advantages.get("igpo")(jnp.asarray(rewards, jnp.float32),
                               answer_probs=jnp.asarray(probs, jnp.float32),
                               step_mask=jnp.asarray(mask), group_size=g, gamma=gamma)
  np.testing.assert_allclose(np.asarray(got), _igpo_reference(rewards, probs, mask, g, gamma, 1e-6),
                             rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(got)[~mask] == 0.0)


def test_igpo_turn_rewards_are_gains_then_the_outcome():
  probs = jnp.asarray([[0.1, 0.3, 0.2, 0.9], [0.5, 0.7, 0.0, 0.0]])
  mask = jnp.asarray([[True, True, True], [True, False, False]])
  r = turn_lib.igpo_turn_rewards(jnp.asarray([1.0, 0.0]), probs, mask)
  np.testing.assert_allclose(np.asarray(r), [[0.2, -0.1, 1.0], [0.0, 0.0, 0.0]], atol=1e-7)


def test_one_turn_igpo_is_grpo_with_the_population_std():
  rewards = jnp.asarray([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
  adv = advantages.get("igpo")(rewards, answer_probs=jnp.zeros((8, 2)),
                               step_mask=jnp.ones((8, 1), bool), group_size=4)
  grpo = advantages.get("grpo")(rewards, group_size=4, unbiased=False, eps=1e-6)
  np.testing.assert_allclose(np.asarray(adv)[:, 0], np.asarray(grpo), atol=1e-5)


def test_igpo_names_a_wrong_answer_probs_shape():
  with pytest.raises(ValueError, match=r"answer_probs has shape \(2, 3\); expected \[N, K \+ 1\]"):
    advantages.get("igpo")(jnp.zeros(2), answer_probs=jnp.zeros((2, 3)),
                           step_mask=jnp.ones((2, 3), bool), group_size=2)


def _answers(b, width=4, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, width + 1, b)
  ids = rng.integers(3, TOK.vocab_size, (b, width)).astype(np.int32)
  mask = np.arange(width)[None] < lengths[:, None]
  return np.where(mask, ids, 0), mask


def test_answer_probs_equal_an_explicit_teacher_forced_pass():
  batch, ro, info = _scripted(0)
  b = batch["prompt_ids"].shape[0]
  aids, amask = _answers(b)
  got = np.asarray(multiturn.answer_probs(MODEL, PARAMS, ro, info, jnp.asarray(aids),
                                          jnp.asarray(amask), group_size=G))
  k1 = SPEC.max_turns + 1
  assert got.shape == (b * G, k1)
  seqs, spans = [], []
  for r in range(b * G):
    prompt = ro.prompt_ids[r][ro.prompt_mask[r]].tolist()
    answer = aids[r // G][amask[r // G]].tolist()
    for k in range(k1):
      hist = ro.completion_ids[r][(info.token_turn[r] >= 0) & (info.token_turn[r] < k)].tolist()
      seqs.append(prompt + hist + answer)
      spans.append((len(prompt) + len(hist), len(answer)))
  width = max(map(len, seqs))
  ids = np.zeros((len(seqs), width), np.int32)
  real = np.zeros((len(seqs), width), bool)
  for i, s in enumerate(seqs):
    ids[i, :len(s)], real[i, :len(s)] = s, True
  # One right-padded causal pass: lp[i, t] = log p(ids[i, t] | ids[i, :t]).
  lp = np.asarray(M.token_logps(MODEL, PARAMS, jnp.asarray(ids), jnp.asarray(real))[0],
                  np.float64)
  want = np.array([np.exp(np.mean(lp[i, a:a + n])) for i, (a, n) in enumerate(spans)])
  np.testing.assert_allclose(got.reshape(-1), want, rtol=2e-5)
  # A turn that did not happen adds nothing: P stays at the last turn's value.
  for r in range(b * G):
    n = int(info.num_turns[r])
    np.testing.assert_allclose(got[r, n:], got[r, n], rtol=1e-6)


def test_multi_turn_step_with_igpo_compiles_once():
  settings = RLSettings.from_config(dict(group_size=G, advantage="igpo", kl_coef=0.0))
  opt = optax.adam(1e-3)
  state = online.init_state(PARAMS, opt, jax.random.PRNGKey(1), settings)
  update = online.make_update(MODEL, [multiturn.env_reward()], opt, settings, SAMPLING,
                              env=ScriptedEnv(), env_spec=SPEC, donate=False)
  for seed in range(2):
    batch = {k: jnp.asarray(v) for k, v in _batch(seed).items()}
    aids, amask = _answers(batch["prompt_ids"].shape[0], seed=seed)
    batch.update(answer_ids=jnp.asarray(aids), answer_mask=jnp.asarray(amask))
    state, m = update(state, batch, jax.random.PRNGKey(seed))
    assert np.isfinite(float(m["pg_loss"])) and float(m["grad_norm"]) > 0
  assert update._cache_size() == 1  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="no answer_ids: use a task whose records have an"):
    update(state, {k: jnp.asarray(v) for k, v in _batch(0).items()}, jax.random.PRNGKey(0))


def test_single_turn_step_refuses_igpo():
  settings = RLSettings.from_config(dict(group_size=G, advantage="igpo"))
  with pytest.raises(ValueError, match="answer_probs"):
    online.make_update(MODEL, [multiturn.env_reward()], optax.adam(1e-3), settings, SAMPLING)


def test_igpo_config_errors_are_named_before_anything_is_written(tmp_path):
  from experiments import agentic_calculator  # pylint: disable=import-outside-toplevel
  from rlhf_jax import demo  # pylint: disable=import-outside-toplevel
  from rlhf_jax.train import online_loop  # pylint: disable=import-outside-toplevel
  c = demo.get_config("runlocal")  # single-turn: no turns, no answer probabilities
  c.workdir = str(tmp_path / "single")
  c.rl.advantage = "igpo"
  with pytest.raises(ValueError, match="rl.advantage='igpo' needs 'answer_probs'"):
    online_loop.train(c)
  c = agentic_calculator.get_config("runlocal")
  c.workdir = str(tmp_path / "no_answers")
  c.rl.advantage = "igpo"
  c.task = {"name": "jsonl", "path": str(tmp_path / "p.jsonl")}
  c.train.prompts_per_step, c.sft.steps = 2, 0  # (with SFT, its own error names the answers)
  (tmp_path / "p.jsonl").write_text("".join(f'{{"prompt": "{i}*2="}}\n' for i in range(10, 40)))
  with pytest.raises(ValueError, match=r"\d+ training records \(first: #0\) have no 'answer'"):
    online_loop.train(c)
  assert not (tmp_path / "single").exists() and not (tmp_path / "no_answers").exists()
