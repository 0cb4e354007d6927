"""Tests for rlhf_jax.guards (non-finite skip, counters, loss spikes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import guards as G

TX = optax.sgd(0.1)


def loss_fn(params, x):
  return jnp.mean((x @ params["w"]) ** 2)


@jax.jit
def train_step(state, guard, x):
  params, opt, rng = state
  loss, grads = jax.value_and_grad(loss_fn)(params, x)
  updates, new_opt = TX.update(grads, opt, params)
  new_state = (optax.apply_updates(params, updates), new_opt,
               jax.random.fold_in(rng, 1))
  spike = G.is_loss_spike(guard, loss, k=3.0)
  out, skipped = G.apply_if_finite(new_state, state, loss, grads, extra_bad=spike)
  return out, G.nonfinite_update(guard, loss, skipped), skipped, loss


def init_state():
  params = {"w": jnp.ones((3, 2)) * 0.1}
  return (params, TX.init(params), jax.random.key(0))


def test_is_finite_tree():
  assert bool(G.is_finite_tree({"a": jnp.ones(3), "n": jnp.arange(3)}))
  assert not bool(G.is_finite_tree({"a": jnp.array([1.0, jnp.nan])}))
  assert not bool(G.is_finite_tree([jnp.ones(2), jnp.array(-jnp.inf)]))
  assert bool(G.is_finite_tree({}))
  assert not bool(jax.jit(G.is_finite_tree)((jnp.ones(2), jnp.array([jnp.inf]))))


@pytest.mark.parametrize("bad", ["nan_x", "inf_x", None])
def test_apply_if_finite_in_jit(bad):
  state, guard = init_state(), G.nonfinite_init()
  x = np.ones((4, 3), np.float32)
  if bad == "nan_x":
    x[0, 0] = np.nan
  elif bad == "inf_x":
    x[1, 2] = np.inf
  new, guard, skipped, _ = train_step(state, guard, x)
  assert bool(skipped) == (bad is not None)
  changed = not np.array_equal(np.asarray(new[0]["w"]), np.asarray(state[0]["w"]))
  assert changed == (bad is None)
  assert bool(G.is_finite_tree(new[0]))
  # Typed random keys pass through the select (advanced only when accepted).
  same_key = np.array_equal(jax.random.key_data(new[2]), jax.random.key_data(state[2]))
  assert same_key == (bad is not None)
  assert int(guard.total) == int(bad is not None)


def test_apply_if_finite_structure_mismatch():
  with pytest.raises(ValueError, match="same pytree structure"):
    G.apply_if_finite({"a": 1.0}, {"b": 1.0}, 0.0, {})


def test_counter_consecutive_and_total():
  init, update = G.nonfinite_counter
  g = init()
  pattern = [True, True, False, True, True, True, False]
  expect_consec, expect_total, c, t = [], [], 0, 0
  for b in pattern:  # independent reference
    c = c + 1 if b else 0
    t += b
    expect_consec.append(c)
    expect_total.append(t)
  upd = jax.jit(update)
  for b, ec, et in zip(pattern, expect_consec, expect_total):
    g = upd(g, jnp.float32(1.0), jnp.asarray(b))
    assert (int(g.consecutive), int(g.total)) == (ec, et)


def test_loss_spike_matches_numpy_reference():
  w, k = 4, 2.0
  losses = [1.0, 1.2, 0.9, 1.1, 1.05, 5.0, 1.0, np.nan, 0.95, 1.12, 9.0]
  g = G.nonfinite_init(window=w)
  hist = []  # accepted losses, float64 numpy reference
  upd = jax.jit(G.nonfinite_update)
  spike_fn = jax.jit(lambda g, l: G.is_loss_spike(g, l, k=k))
  flagged = []
  for loss in losses:
    if len(hist) >= w and np.isfinite(loss):
      last = np.asarray(hist[-w:], np.float64)
      ref = loss > last.mean() + k * last.std()
    else:
      ref = False
    got = bool(spike_fn(g, jnp.float32(loss)))
    assert got == ref, (loss, hist)
    skipped = got or not np.isfinite(loss)
    if not skipped:
      hist.append(loss)
    flagged.append(got)
    g = upd(g, jnp.float32(loss), jnp.asarray(skipped))
  assert flagged[5] and flagged[-1] and sum(flagged) == 2
  assert int(g.total) == 3  # two spikes + one NaN
  assert int(g.count) == len(hist)


def test_spike_disabled_and_arg_errors():
  assert not bool(G.is_loss_spike(G.nonfinite_init(), 1e9))
  with pytest.raises(ValueError, match="window=-1"):
    G.nonfinite_init(window=-1)
  with pytest.raises(ValueError, match="min_count=1"):
    G.is_loss_spike(G.nonfinite_init(window=3), 1.0, min_count=1)


def test_check_consecutive():
  G.check_consecutive(jnp.int32(2), max_bad=3)
  with pytest.raises(RuntimeError, match="3 consecutive train steps were skipped.*max_bad=3"):
    G.check_consecutive(jnp.int32(3), max_bad=3)
  with pytest.raises(ValueError, match="max_bad=0"):
    G.check_consecutive(0, max_bad=0)


def test_end_to_end_k_bad_steps_raise():
  state, guard = init_state(), G.nonfinite_init(window=2)
  nan_x = np.full((4, 3), np.nan, np.float32)
  for _ in range(3):
    state, guard, skipped, _ = train_step(state, guard, nan_x)
    assert bool(skipped)
  with pytest.raises(RuntimeError, match="3 consecutive"):
    G.check_consecutive(guard.consecutive, max_bad=3)
  state, guard, skipped, _ = train_step(state, guard, np.ones((4, 3), np.float32))
  assert not bool(skipped) and int(guard.consecutive) == 0 and int(guard.total) == 3
