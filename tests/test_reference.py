"""Reference-policy updates (fixed / every k updates / EMA): float64 numpy references,
reductions between them, the fused RL step moving its reference, and bad settings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.train import online
from rlhf_jax.train import reference as ref_lib
from rlhf_jax.train.rl_config import RLSettings
from test_online import prompts, setup


def _trees(n, seed=0):
  rng = np.random.RandomState(seed)
  return [{"a": rng.randn(3, 2), "b": {"c": rng.randn(4)}} for _ in range(n)]


def _run(rule, policy_iterates):
  """Applies `rule.update` under jit after each policy iterate; float32 results."""
  f32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)  # noqa: E731
  ref = rule.init(f32(policy_iterates[0]))
  update = jax.jit(rule.update)
  out = []
  for step, params in enumerate(policy_iterates[1:], start=1):
    ref = update(ref, f32(params), jnp.asarray(step, jnp.int32))
    out.append(jax.tree.map(np.asarray, ref))
  return out


def _close(got, want, **kw):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, **kw)


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 1.0])
def test_ema_matches_numpy(decay):
  its = _trees(6)
  want, ref = [], its[0]
  for params in its[1:]:  # ref <- d ref + (1 - d) theta, in float64
    ref = jax.tree.map(lambda r, p: decay * r + (1 - decay) * p, ref, params)
    want.append(ref)
  for got, w in zip(_run(ref_lib.ema_reference(decay=decay), its), want):
    _close(got, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("every", [1, 2, 3])
def test_periodic_matches_numpy(every):
  its = _trees(8, seed=1)
  got = _run(ref_lib.periodic_reference(every=every), its)
  for step in range(1, 8):  # the newest iterate whose index is a multiple of `every`
    _close(got[step - 1], its[(step // every) * every], rtol=0, atol=1e-6)


def test_reductions():
  its = _trees(5, seed=2)
  fixed = _run(ref_lib.fixed_reference(), its)
  _close(_run(ref_lib.ema_reference(decay=1.0), its), fixed, rtol=0, atol=0)
  _close(_run(ref_lib.ema_reference(decay=0.0), its),
         _run(ref_lib.periodic_reference(every=1), its), rtol=0, atol=0)
  _close(fixed[-1], its[0], rtol=0, atol=1e-6)


def test_bad_settings_are_named():
  with pytest.raises(ValueError, match="every must be an int >= 1"):
    ref_lib.periodic_reference(every=0)
  with pytest.raises(ValueError, match=r"decay must be in \[0, 1\]"):
    ref_lib.ema_reference(decay=1.5)
  with pytest.raises(ValueError, match="rl.ref_update_every and rl.ref_ema_decay are exclusive"):
    RLSettings.from_config(dict(ref_update_every=2, ref_ema_decay=0.9))
  with pytest.raises(ValueError, match=r"rl.ref_ema_decay must be in \[0, 1\], got -0.1"):
    RLSettings.from_config(dict(ref_ema_decay=-0.1))
  with pytest.raises(ValueError, match="rl.ref_update_every must be >= 0"):
    RLSettings.from_config(dict(ref_update_every=-1))


def _steps(n, **rl):
  model, settings, sc, opt, rewards, state = setup(**rl)
  update = online.make_update(model, rewards, opt, settings, sc, donate=False)
  states = [state]
  for i in range(n):
    state, _ = update(state, prompts(), jax.random.PRNGKey(7 + i))
    states.append(state)
  return states


def test_the_rl_step_moves_its_reference():
  fixed = _steps(3)
  periodic = _steps(3, ref_update_every=2)
  ema = _steps(3, ref_ema_decay=0.75)
  p0 = fixed[0].params
  for s in fixed:
    _close(s.ref_params, p0, rtol=0, atol=0)
  # Same data and rng, so the policy iterates agree until the references differ (step 3).
  _close(periodic[1].ref_params, p0, rtol=0, atol=0)
  _close(periodic[2].ref_params, periodic[2].params, rtol=0, atol=0)
  _close(periodic[3].ref_params, periodic[2].params, rtol=0, atol=0)
  assert not np.allclose(jax.tree.leaves(periodic[3].params)[0],
                         jax.tree.leaves(periodic[2].params)[0])
  want = p0
  for s in ema[1:]:
    want = jax.tree.map(lambda r, p: 0.75 * np.asarray(r, np.float64) + 0.25 * np.asarray(p),
                        want, s.params)
    _close(s.ref_params, want, rtol=1e-5, atol=1e-6)
