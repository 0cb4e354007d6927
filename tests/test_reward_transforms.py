"""Reward transforms of the score phase (`config.reward_shaping`): each against a float64
numpy reference from its paper's equation, the chain's named errors, and the step wiring
(reference-policy samples for PAR / LSC, the state of dynamic weights)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.rewards import transforms
from rlhf_jax.train import online
from test_online import prompts, setup

RNG = np.random.default_rng(0)
EACH = RNG.normal(size=(8, 3)).astype(np.float32)
REF = RNG.normal(size=(8, 5, 3)).astype(np.float32)


def _sig(x):
  return 1.0 / (1.0 + np.exp(-x))


@pytest.mark.parametrize("mode", ["mean", "wco", "uwo"])
def test_ensemble_matches_numpy(mode):
  e = EACH.astype(np.float64)
  sub = e[:, [0, 2]]
  want = {"mean": sub.mean(1), "wco": sub.min(1), "uwo": sub.mean(1) - 0.3 * sub.var(1)}[mode]
  out = transforms.ensemble(jnp.asarray(EACH), mode=mode, coef=0.3, columns=(0, 2))
  np.testing.assert_allclose(np.asarray(out), np.stack([want, e[:, 1]], 1), rtol=1e-5, atol=1e-6)


def test_lsc_and_par_match_numpy():
  e, r = EACH.astype(np.float64), REF.astype(np.float64)
  q = np.quantile(r, 0.85, axis=1)
  np.testing.assert_allclose(np.asarray(transforms.lsc(jnp.asarray(EACH), ref_rewards=jnp.asarray(REF))),
                             np.log(_sig(e - q)), rtol=1e-5, atol=1e-6)
  want = _sig(e[:, None, :] - r).mean(1)
  np.testing.assert_allclose(np.asarray(transforms.par(jnp.asarray(EACH), ref_rewards=jnp.asarray(REF))),
                             want, rtol=1e-5, atol=1e-6)
  # One reference sample equal to the reward: PAR gives exactly 1/2.
  np.testing.assert_allclose(np.asarray(transforms.par(jnp.asarray(EACH),
                                                       ref_rewards=jnp.asarray(EACH)[:, None])),
                             0.5, atol=1e-7)


def test_noisy_verifier_is_unbiased_on_its_columns_only():
  clean = (RNG.random((20000, 2)) < 0.4).astype(np.float32)
  flip = RNG.random(clean.shape)
  noisy = np.where(clean > 0, np.where(flip < 0.2, 0.0, 1.0), np.where(flip < 0.1, 1.0, 0.0))
  out = np.asarray(transforms.noisy_verifier(jnp.asarray(noisy, jnp.float32), rho0=0.1, rho1=0.2,
                                             columns=(0,)))
  np.testing.assert_allclose(out[:, 0], (noisy[:, 0] - 0.1) / 0.7, rtol=1e-6)
  np.testing.assert_array_equal(out[:, 1], noisy[:, 1])
  assert abs(out[:, 0].mean() - clean[:, 0].mean()) < 0.02  # E[R̂] = E[R]


@pytest.mark.parametrize("temperature", [0.0, 0.5])
def test_spo_win_rate_matches_numpy(temperature):
  e = np.asarray([[1.0, 0.0], [0.0, 0.0], [2.0, 1.0], [1.0, 3.0]], np.float32)  # G = 2, two prompts
  e = np.concatenate([e, e[::-1]], 0)  # G = 4 below: [8, 2]
  out = np.asarray(transforms.spo_win_rate(jnp.asarray(e), group_size=4, temperature=temperature))
  want = np.zeros_like(e, np.float64)
  for b in range(2):
    for k in range(2):
      r = e[4 * b:4 * b + 4, k].astype(np.float64)
      for i in range(4):
        ps = [(_sig((r[i] - r[j]) / temperature) if temperature else
               float(r[i] > r[j]) + 0.5 * float(r[i] == r[j])) for j in range(4) if j != i]
        want[4 * b + i, k] = np.mean(ps)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_dynamic_weights_state_moves_towards_the_lagging_objective():
  shaping = transforms.Shaping.from_config([dict(name="dynamic_weights", lr=1.0)])
  state = shaping.init(2)
  each = jnp.asarray([[1.0, 0.0], [1.0, 0.0]])
  out, state2 = shaping(each, group_size=2, state=state)
  np.testing.assert_allclose(np.asarray(out)[:, 0], [0.5, 0.5])  # equal initial weights
  w = np.exp([-1.0, 0.0]) / np.exp([-1.0, 0.0]).sum()
  np.testing.assert_allclose(np.asarray(state2[0].weights), w, rtol=1e-6)
  with pytest.raises(ValueError, match="keeps state"):
    shaping(each, group_size=2, state=None)


@pytest.mark.parametrize("spec, match", [
    ("nope", r"unknown transform 'nope'"),
    (dict(name="ensemble", mod="wco"), r"reward_shaping\[0\] \(ensemble\) has 'mod'.*did you mean 'mode'"),
    (3, r"reward_shaping\[0\]=3"),
])
def test_bad_shaping_configs_are_named(spec, match):
  with pytest.raises(ValueError, match=match):
    transforms.Shaping.from_config([spec])


def test_bad_columns_and_modes_are_named():
  with pytest.raises(ValueError, match=r"columns=\[5\]"):
    transforms.ensemble(jnp.asarray(EACH), columns=(5,))
  with pytest.raises(ValueError, match=r"mode='max' is unknown"):
    transforms.ensemble(jnp.asarray(EACH), mode="max")


def _even_fraction(prompt_ids, completion_ids, completion_mask, extras):
  m = completion_mask.astype(jnp.float32)
  return jnp.sum((completion_ids % 2 == 0) * m, 1) / jnp.maximum(jnp.sum(m, 1), 1.0)


def test_step_scores_reference_samples_and_keeps_transform_state():
  model, settings, sc, opt, _, state0 = setup()
  shaping = ("par", dict(name="dynamic_weights", lr=0.5))
  fns = [_even_fraction, lambda p, c, m, e: 1.0 - _even_fraction(p, c, m, e)]
  state = online.init_state(state0.params, opt, jax.random.PRNGKey(1), settings,
                            reward_shaping=shaping, num_rewards=2)
  update = online.make_update(model, fns, opt, settings, sc, donate=False,
                              reward_shaping=shaping)
  w0 = np.asarray(state.shaping_state[1].weights)
  for i in range(2):
    state, m = update(state, prompts(n=4, seed=i), jax.random.PRNGKey(i))
  assert update._cache_size() == 1  # pylint: disable=protected-access
  assert 0.0 < float(m["reward_0_mean"]) < 1.0  # one PAR-combined column in (0, 1)
  assert np.asarray(m["reward_0_mean"]).shape == () and "reward_1_mean" not in m
  assert not np.allclose(np.asarray(state.shaping_state[1].weights), w0)


def test_remax_with_shaping_is_refused():
  model, _, sc, opt, _, _ = setup()
  from rlhf_jax.train.rl_config import RLSettings
  settings = RLSettings.from_config(dict(group_size=4, advantage="remax"))
  with pytest.raises(ValueError, match="config.reward_shaping"):
    online.make_update(model, [_even_fraction], opt, settings, sc,
                       reward_shaping=("spo_win_rate",))
