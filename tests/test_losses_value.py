"""B-Coder (value-based, conservative Bellman backup) against a float64 numpy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rlhf_jax import losses
from rlhf_jax.losses import value_based as vb

B, T, V = 3, 5, 6
RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(B, T, V)) * 2
VALUES = RNG.normal(size=(B, T))
TARGET_LOGITS = RNG.normal(size=(B, T, V)) * 2
TARGET_VALUES = RNG.normal(size=(B, T))
FROZEN = RNG.normal(size=(B, T, V)) * 2
ACTIONS = RNG.integers(0, V, size=(B, T))
REWARDS = RNG.normal(size=(B, T))
LENGTHS = np.array([5, 3, 1])
MASK = np.arange(T)[None, :] < LENGTHS[:, None]
KW = dict(alpha=0.7, gamma=0.9, adv_coef=0.1, ce_coef=0.5, margin=0.3)


@pytest.fixture(autouse=True)
def _strict_ranks():
  with jax.numpy_rank_promotion("raise"):
    yield


def _f(x):
  return jnp.asarray(x, jnp.int32 if np.asarray(x).dtype.kind in "iu" else
                     (bool if np.asarray(x).dtype == bool else jnp.float32))


def reference(logits, values, actions, rewards, lengths, frozen, t_logits, t_values, *, alpha,
              gamma, adv_coef, ce_coef, margin):
  """Loops over tokens in float64, written from the paper's definitions."""
  out = np.zeros(actions.shape)
  parts = np.zeros((3,) + actions.shape)
  for b in range(actions.shape[0]):
    for t in range(lengths[b]):
      q = alpha * (logits[b, t] - logits[b, t].max()) + values[b, t]
      y = rewards[b, t]
      if t + 1 < lengths[b]:
        a_star = int(np.argmax(frozen[b, t + 1]))
        qn = alpha * (t_logits[b, t + 1] - t_logits[b, t + 1].max()) + t_values[b, t + 1]
        y += gamma * qn[a_star]
      a = actions[b, t]
      td = (q[a] - y) ** 2
      adv = q - values[b, t]
      adv_loss = max(adv[j] + (margin if j != a else 0.0) for j in range(len(q))) - adv[a]
      z = logits[b, t] - logits[b, t].max()
      ce = -(z[a] - np.log(np.exp(z).sum()))
      out[b, t] = td + adv_coef * adv_loss + ce_coef * ce
      parts[:, b, t] = td, adv_loss, ce
  return out, parts


def _call(logits=LOGITS, frozen=FROZEN, target=True, jit=False, **kw):
  kw = {**KW, **kw}
  args = (_f(logits), _f(VALUES), _f(ACTIONS), _f(REWARDS), _f(MASK))
  if target:
    args += (_f(TARGET_LOGITS), _f(TARGET_VALUES))
  fn = lambda *a: vb.bcoder(*a, frozen_logits=_f(frozen), **kw)  # noqa: E731
  return (jax.jit(fn) if jit else fn)(*args)


@pytest.mark.parametrize("jit", [False, True])
def test_matches_float64_reference(jit):
  loss, ex = _call(jit=jit)
  want, parts = reference(LOGITS, VALUES, ACTIONS, REWARDS, LENGTHS, FROZEN, TARGET_LOGITS,
                          TARGET_VALUES, **KW)
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ex.td_loss, parts[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ex.adv_loss, parts[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ex.ce_loss, parts[2], rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(loss)[~MASK] == 0)
  assert losses.get("bcoder") is vb.bcoder
  decl = losses.declaration("bcoder")
  assert decl.kind == "value" and decl.needs == ("frozen_logits",)
  assert decl.hyperparameter_names == ("alpha", "gamma", "adv_coef", "ce_coef", "margin")


def test_special_cases():
  # γ = 0: the target is the immediate reward.
  _, ex = _call(gamma=0.0)
  np.testing.assert_allclose(ex.targets, np.where(MASK, REWARDS, 0.0), atol=1e-6)
  # The greedy LM token has advantage 0: Q(s, argmax ℓ) = V(s) = max_a Q(s, a).
  q = vb.bcoder_q_values(_f(LOGITS), _f(VALUES), alpha=0.7)
  np.testing.assert_allclose(jnp.max(q, -1), VALUES, atol=1e-6)
  np.testing.assert_array_equal(jnp.argmax(q, -1), LOGITS.argmax(-1))
  # frozen q = the target's logits: Q-learning's r + γ max_a Q̄(s', a).
  _, ex = _call(frozen=TARGET_LOGITS)
  qn = np.asarray(vb.bcoder_q_values(_f(TARGET_LOGITS), _f(TARGET_VALUES), alpha=0.7)).max(-1)
  boot = np.concatenate([qn[:, 1:], np.zeros((B, 1))], 1) * np.concatenate(
      [MASK[:, 1:], np.zeros((B, 1), bool)], 1)
  np.testing.assert_allclose(ex.targets, np.where(MASK, REWARDS + 0.9 * boot, 0.0), atol=1e-5)
  # No target network: the online Q (stop-gradient) is bootstrapped.
  a, _ = _call(target=False)
  want, _ = reference(LOGITS, VALUES, ACTIONS, REWARDS, LENGTHS, FROZEN, LOGITS, VALUES, **KW)
  np.testing.assert_allclose(a, want, rtol=1e-5, atol=1e-5)
  # Pure TD with the regularisers off; margin 0 makes L_adv = −A(s, a_t) = α(max ℓ − ℓ_a).
  td, ex = _call(adv_coef=0.0, ce_coef=0.0, margin=0.0)
  np.testing.assert_allclose(td, ex.td_errors ** 2, rtol=1e-5, atol=1e-6)
  gap = LOGITS.max(-1) - np.take_along_axis(LOGITS, ACTIONS[..., None], -1)[..., 0]
  np.testing.assert_allclose(ex.adv_loss, np.where(MASK, 0.7 * gap, 0.0), rtol=1e-5, atol=1e-5)
  # Padding: changing masked entries changes nothing.
  noisy = np.where(MASK[..., None], LOGITS, 100.0)
  np.testing.assert_allclose(_call(logits=noisy)[0], _call()[0], atol=1e-6)


def test_gradients_flow_through_q_only():
  def total(logits, values, t_logits, t_values):
    loss, _ = vb.bcoder(logits, values, _f(ACTIONS), _f(REWARDS), _f(MASK), t_logits, t_values,
                        frozen_logits=_f(FROZEN), **KW)
    return jnp.sum(loss)
  g = jax.grad(total, argnums=(0, 1, 2, 3))(_f(LOGITS), _f(VALUES), _f(TARGET_LOGITS),
                                            _f(TARGET_VALUES))
  assert float(jnp.abs(g[0]).sum()) > 0 and float(jnp.abs(g[1]).sum()) > 0
  np.testing.assert_array_equal(g[2], 0.0)
  np.testing.assert_array_equal(g[3], 0.0)
  # d loss / d V(s_t) = 2 (Q(s_t, a_t) − y_t) (the advantage and CE terms do not depend on V).
  _, ex = _call()
  np.testing.assert_allclose(g[1], 2 * np.asarray(ex.td_errors), rtol=1e-4, atol=1e-5)
  check_grads(lambda lg: total(lg, _f(VALUES), _f(TARGET_LOGITS),
                                             _f(TARGET_VALUES)),
                            (_f(LOGITS) + 0.01 * _f(RNG.normal(size=(B, T, V))),), order=1,
                            modes=("rev",), atol=5e-2, rtol=5e-2)


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="gamma must be in"):
    _call(gamma=1.5)
  with pytest.raises(ValueError, match="alpha must be > 0"):
    _call(alpha=0.0)
  with pytest.raises(ValueError, match="frozen_logits must be"):
    _call(frozen=FROZEN[:, :, :3])
  with pytest.raises(ValueError, match="actions must be integer"):
    vb.bcoder(_f(LOGITS), _f(VALUES), _f(ACTIONS.astype(float)), _f(REWARDS), _f(MASK),
              frozen_logits=_f(FROZEN))
  with pytest.raises(ValueError, match="both target_logits and target_values"):
    vb.bcoder(_f(LOGITS), _f(VALUES), _f(ACTIONS), _f(REWARDS), _f(MASK), _f(TARGET_LOGITS),
              frozen_logits=_f(FROZEN))
