"""Shared helpers of losses, advantages and rewards vs float64 numpy references and checks."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import expit

from rlhf_jax.advantages.base import (check_token_inputs, expand_to_tokens, group_mean,
                                      group_std, group_view, safe_div, safe_sqrt)
from rlhf_jax.advantages.bnpo import batch_moments
from rlhf_jax.advantages.token import reverse_discounted_sum
from rlhf_jax.losses.common import (check_float, check_group_size, check_inputs, check_rank,
                                    check_same_shape, grouped, log_sigmoid, masked_mean,
                                    masked_sum, masked_var, next_step)
from rlhf_jax.losses.policy_gradient import clipped_surrogate, rover_loss, sequence_log_ratio
from rlhf_jax.losses.preference import (check_batch_vector, check_pair, logratios, pair_extras,
                                        soft_bce)
from rlhf_jax.losses.preference_list import check_list
from rlhf_jax.losses.reward_model import smoothed_log_likelihood
from rlhf_jax.losses.reward_model_dist import hl_gauss_edges, two_hot_targets
from rlhf_jax.rewards.base import check_reward_inputs, get_extra
from rlhf_jax.rewards.callback import run_with_timeout, score_texts
from rlhf_jax.rewards.starc import uniform_policy_value

RNG = np.random.default_rng(7)
B, T = 3, 5
X = RNG.normal(size=(B, T))
MASK = (np.arange(T)[None] < np.array([5, 2, 3])[:, None])


def close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol)


def j(x):
  return jnp.asarray(x, jnp.float32)


# ---------------------------------------------------------------- masked reductions

def test_masked_sum_mean_var_match_numpy():
  rows = [X[i][MASK[i]] for i in range(B)]
  close(masked_sum(j(X), jnp.asarray(MASK), axis=-1), [r.sum() for r in rows])
  close(masked_mean(j(X), jnp.asarray(MASK), axis=-1), [r.mean() for r in rows])
  close(masked_var(j(X), jnp.asarray(MASK), axis=-1), [r.var() for r in rows])
  close(masked_var(j(X), jnp.asarray(MASK), axis=-1, unbiased=True),
        [r.var(ddof=1) for r in rows])
  close(masked_mean(j(X), None), X.mean())
  close(masked_sum(j(X), None), X.sum())
  close(masked_var(j(X), None), X.var())


def test_next_step_shifts_left_along_the_last_axis_with_a_zero_after_the_end():
  x = np.arange(1.0, 7.0).reshape(2, 3)
  np.testing.assert_array_equal(np.asarray(next_step(jnp.asarray(x))),
                                [[2.0, 3.0, 0.0], [5.0, 6.0, 0.0]])
  assert next_step(jnp.ones((4,), jnp.bfloat16)).dtype == jnp.bfloat16


def test_masked_mean_all_false_mask_is_zero_not_nan():
  out = masked_mean(j(X), jnp.zeros((B, T), bool), axis=-1)
  assert np.all(np.isfinite(out))
  close(out, np.zeros(B))
  close(masked_mean(j(X), jnp.zeros((B, T), bool)), 0.0)


# ---------------------------------------------------------------- stable scalar helpers

def test_log_sigmoid_reference_and_extremes():
  x = np.array([-3.0, -0.5, 0.0, 0.7, 4.0])
  close(log_sigmoid(j(x)), np.log(expit(x)))
  ext = np.asarray(log_sigmoid(j([-1e3, 1e3])))
  assert np.all(np.isfinite(ext))
  close(ext, [-1e3, 0.0])
  g = jax.grad(lambda z: jnp.sum(log_sigmoid(z)))(j([-1e3, 1e3]))
  assert np.all(np.isfinite(g))
  close(g, [1.0, 0.0])


def test_safe_sqrt_value_and_zero_gradient_at_zero():
  x = np.array([0.0, 0.25, 4.0])
  close(safe_sqrt(j(x)), np.sqrt(x))
  g = jax.grad(lambda z: jnp.sum(safe_sqrt(z)))(j(x))
  assert np.all(np.isfinite(g))
  close(g, [0.0, 0.5 / np.sqrt(0.25), 0.5 / 2.0])


def test_safe_div():
  close(safe_div(j([1.0, 0.0]), j([2.0, 0.0]), 1e-3), [1.0 / 2.001, 0.0])


def test_soft_bce_and_smoothed_log_likelihood():
  z = RNG.normal(size=6) * 3
  p = RNG.uniform(size=6)
  ref = -(p * np.log(expit(z)) + (1 - p) * np.log(expit(-z)))
  close(soft_bce(j(z), j(p)), ref)
  close(smoothed_log_likelihood(j(z), j(p)), -ref)
  close(smoothed_log_likelihood(j(z), 1.0), np.log(expit(z)))


# ---------------------------------------------------------------- groups

def test_grouped_group_view_and_group_stats():
  r = RNG.normal(size=12)
  gv = group_view(j(r), 4)
  assert gv.shape == (3, 4)
  close(grouped(j(r), 3), r.reshape(4, 3))
  rr = r.reshape(3, 4)
  close(group_mean(gv), rr.mean(-1, keepdims=True))
  close(group_std(gv), rr.std(-1, keepdims=True))
  close(group_std(gv, unbiased=True), rr.std(-1, ddof=1, keepdims=True))
  with pytest.raises(ValueError, match="group_size"):
    group_std(j(r).reshape(12, 1), unbiased=True)


def test_batch_moments_matches_numpy():
  r = RNG.integers(0, 2, size=12).astype(np.float64)
  p_hat = r.reshape(4, 3).mean(-1)
  mu, var = batch_moments(j(r), group_size=3)
  close(mu, p_hat.mean())
  close(var, p_hat.var(ddof=1))


def test_check_group_size_names_argument():
  check_group_size(12, 4)
  with pytest.raises(ValueError, match="group_size=5.*my_rewards"):
    check_group_size(12, 5, "my_rewards")
  with pytest.raises(ValueError, match="group_size must be a positive int"):
    check_group_size(12, 0)
  with pytest.raises(ValueError, match="scores"):
    grouped(j(np.zeros(7)), 2, "scores")
  with pytest.raises(ValueError, match="rewards must have rank 1"):
    group_view(j(np.zeros((4, 2))), 2)


# ---------------------------------------------------------------- token helpers

def test_reverse_discounted_sum_matches_python_loop():
  x = RNG.normal(size=(B, T))
  d = RNG.uniform(size=(B, T))
  ref = np.zeros_like(x)
  for b in range(B):
    carry = 0.0
    for t in reversed(range(T)):
      carry = x[b, t] + d[b, t] * carry
      ref[b, t] = carry
  close(reverse_discounted_sum(j(x), j(d)), ref)
  close(jax.jit(reverse_discounted_sum)(j(x), j(d)), ref)


def test_expand_to_tokens():
  adv = RNG.normal(size=B)
  close(expand_to_tokens(j(adv), jnp.asarray(MASK)), np.where(MASK, adv[:, None], 0.0))
  close(expand_to_tokens(j(adv), None), adv)


def test_check_token_inputs_names_argument():
  check_token_inputs(j(X), j(X), jnp.asarray(MASK))
  check_token_inputs(j(X), None, jnp.asarray(MASK))
  with pytest.raises(ValueError, match="values has shape"):
    check_token_inputs(j(X), j(X[:, :2]), jnp.asarray(MASK))
  with pytest.raises(ValueError, match="mask has shape"):
    check_token_inputs(j(X), None, jnp.asarray(MASK[:, :2]))
  with pytest.raises(ValueError, match="rewards must have rank 2"):
    check_token_inputs(j(X[0]), None, jnp.asarray(MASK))


# ---------------------------------------------------------------- policy-gradient helpers

def test_clipped_surrogate_matches_ppo_formula():
  ratio = np.array([0.5, 0.9, 1.0, 1.1, 1.5, 3.0, 0.5, 1.5, 6.0])
  adv = np.array([1.0, 1.0, -1.0, -1.0, 1.0, -1.0, -2.0, -0.5, -1.0])
  el, eh = 0.2, 0.3
  ref = -np.minimum(ratio * adv, np.clip(ratio, 1 - el, 1 + eh) * adv)
  loss, active = clipped_surrogate(j(ratio), j(adv), epsilon_low=el, epsilon_high=eh)
  close(loss, ref)
  unc = -adv * ratio
  clp = -adv * np.clip(ratio, 1 - el, 1 + eh)
  np.testing.assert_array_equal(np.asarray(active), clp > unc)
  c = 3.0
  dual_ref = np.where(adv < 0, np.minimum(ref, -c * adv), ref)
  loss_d, _ = clipped_surrogate(j(ratio), j(adv), epsilon_low=el, epsilon_high=eh, dual_clip=c)
  close(loss_d, dual_ref)
  with pytest.raises(ValueError, match="dual_clip"):
    clipped_surrogate(j(ratio), j(adv), epsilon_low=el, epsilon_high=eh, dual_clip=1.0)


def test_sequence_log_ratio_matches_numpy():
  lp = -np.abs(RNG.normal(size=(B, T)))
  old = lp + 0.3 * RNG.normal(size=(B, T))
  m = MASK.astype(np.float64)
  ref = ((lp - old) * m).sum(-1) / m.sum(-1)
  close(sequence_log_ratio(j(lp), j(old), jnp.asarray(MASK)), ref)
  close(sequence_log_ratio(j(lp), j(old), jnp.zeros((B, T))), np.zeros(B))


def test_rover_loss_matches_numpy():
  lp = -np.abs(RNG.normal(size=(B, T)))
  old = lp + 0.3 * RNG.normal(size=(B, T))
  y = RNG.normal(size=(B, T))
  rho = 0.7
  ref = np.where(MASK, (rho * (lp - old) - y) ** 2, 0.0)
  loss, extras = rover_loss(j(lp), j(old), j(y), jnp.asarray(MASK, jnp.float32), rho=rho)
  close(loss, ref)
  close(extras.ratio, np.exp(lp - old))


# ---------------------------------------------------------------- preference helpers

def test_pair_extras_and_logratios():
  c, r = RNG.normal(size=4), RNG.normal(size=4)
  ex = pair_extras(j(c), j(r))
  close(ex.margins, c - r)
  np.testing.assert_array_equal(np.asarray(ex.accuracies), (c - r > 0).astype(np.float32))
  rc, rr = RNG.normal(size=4), RNG.normal(size=4)
  lc, lr = np.array([1.0, 2, 3, 4]), np.array([4.0, 3, 2, 1])
  a, b = logratios(j(c), j(r), j(rc), j(rr))
  close(a, c - rc)
  close(b, r - rr)
  a, b = logratios(j(c), j(r), None, None, j(lc), j(lr))
  close(a, c / lc)
  close(b, r / lr)


def test_check_pair_and_batch_vector_name_arguments():
  v = j(np.zeros(4))
  assert check_pair(v, v) == (None, None)
  lc, lr = check_pair(v, v, v, v, jnp.array([0, 2, 3, 4]), jnp.array([1, 1, 1, 1]))
  close(lc, [1.0, 2, 3, 4])
  check_batch_vector(v, "chosen_logps")
  with pytest.raises(ValueError, match="my_vec must be a \\[B\\] vector"):
    check_batch_vector(j(np.zeros((2, 2))), "my_vec")
  with pytest.raises(ValueError, match="ref_chosen_logps and ref_rejected_logps"):
    check_pair(v, v, v, None)
  with pytest.raises(ValueError, match="ipo needs ref_chosen_logps"):
    check_pair(v, v, need_ref=True, method="ipo")
  with pytest.raises(ValueError, match="simpo length-normalises"):
    check_pair(v, v, need_lengths=True, method="simpo")
  with pytest.raises(ValueError, match="rejected_logps has shape"):
    check_pair(v, j(np.zeros(3)))


def test_check_list_names_argument():
  s = j(np.zeros((2, 3)))
  m, lengths = check_list(jnp.ones((2, 3)), jnp.zeros((2, 3)), logps=s)
  assert m.dtype == jnp.bool_
  close(lengths, np.ones((2, 3)))
  with pytest.raises(ValueError, match="mask has shape"):
    check_list(jnp.ones((2, 2)), logps=s)
  with pytest.raises(ValueError, match="lengths has shape"):
    check_list(jnp.ones((2, 3)), jnp.ones((2, 2)), logps=s)
  with pytest.raises(ValueError, match="logps must have rank 2"):
    check_list(jnp.ones((2, 3)), logps=j(np.zeros(3)))


# ---------------------------------------------------------------- generic checks

def test_check_rank_float_same_shape_inputs_name_arguments():
  check_rank(j(X), 2, "x")
  with pytest.raises(ValueError, match="my_arr must have rank 1"):
    check_rank(j(X), 1, "my_arr")
  check_float(j(X), "x")
  with pytest.raises(ValueError, match="ids must be a floating-point array"):
    check_float(jnp.zeros(3, jnp.int32), "ids")
  check_same_shape([j(X), j(X)], ["a", "b"])
  with pytest.raises(ValueError, match="b has shape .* but a has shape"):
    check_same_shape([j(X), j(X[:, :2])], ["a", "b"])
  check_inputs(rank=2, a=j(X), b=j(X), c=None)
  with pytest.raises(ValueError, match="b has shape"):
    check_inputs(a=j(X), b=j(X[:, :2]))
  with pytest.raises(ValueError, match="b must have rank 2"):
    check_inputs(rank=2, a=j(X), b=j(X[0]))
  with pytest.raises(ValueError, match="b must be a floating-point"):
    check_inputs(a=j(X), b=jnp.zeros((B, T), jnp.int32))


# ---------------------------------------------------------------- distributional targets

def test_hl_gauss_edges_and_two_hot_targets():
  close(hl_gauss_edges(v_min=-1.0, v_max=1.0, num_bins=4), np.linspace(-1, 1, 5))
  with pytest.raises(ValueError, match="v_max must be > v_min"):
    hl_gauss_edges(v_min=1.0, v_max=1.0, num_bins=4)
  with pytest.raises(ValueError, match="num_bins"):
    hl_gauss_edges(v_min=0.0, v_max=1.0, num_bins=1)
  y = np.array([-2.0, -1.0, -0.3, 0.0, 0.55, 1.0, 5.0])
  atoms = np.linspace(-1, 1, 5)
  ref = np.zeros((len(y), 5))
  for i, v in enumerate(np.clip(y, -1, 1)):
    k = min(int(np.searchsorted(atoms, v, side="right")) - 1, 3)
    w = (v - atoms[k]) / (atoms[k + 1] - atoms[k])
    ref[i, k] += 1 - w
    ref[i, k + 1] += w
  p = np.asarray(two_hot_targets(j(y), v_min=-1.0, v_max=1.0, num_bins=5), np.float64)
  close(p, ref)
  close(p @ atoms, np.clip(y, -1, 1))
  with pytest.raises(ValueError, match="values must have rank 1"):
    two_hot_targets(j(np.zeros((2, 2))), v_min=-1.0, v_max=1.0, num_bins=5)


# ---------------------------------------------------------------- rewards helpers

def test_uniform_policy_value_matches_linear_solve():
  s, a = 3, 2
  p = RNG.uniform(size=(s, a, s))
  p /= p.sum(-1, keepdims=True)
  r = RNG.normal(size=(s, a, s))
  gamma = 0.8
  p_pi = p.mean(1)
  r_pi = (p * r).sum(-1).mean(1)
  ref = np.linalg.solve(np.eye(s) - gamma * p_pi, r_pi)
  close(uniform_policy_value(j(r), j(p), gamma), ref, tol=1e-4)
  with pytest.raises(ValueError, match="gamma"):
    uniform_policy_value(j(r), j(p), 1.0)


def test_check_reward_inputs_names_argument():
  ids = jnp.zeros((2, 3), jnp.int32)
  check_reward_inputs(ids, ids, ids)
  with pytest.raises(ValueError, match="prompt_ids must be"):
    check_reward_inputs(ids[0], ids, ids)
  with pytest.raises(ValueError, match="completion_ids must be"):
    check_reward_inputs(ids, ids[0], ids)
  with pytest.raises(ValueError, match="completion_mask has shape"):
    check_reward_inputs(ids, ids, ids[:, :2])
  with pytest.raises(ValueError, match="one prompt row per completion"):
    check_reward_inputs(ids[:1], ids, ids)


def test_get_extra_names_key_and_reward():
  assert get_extra({"answer_ids": 3}, "answer_ids", "math") == 3
  with pytest.raises(KeyError, match="math needs batch_extras\\['answer_ids'\\]"):
    get_extra({"other": 1}, "answer_ids", "math")
  with pytest.raises(KeyError, match="answer_ids"):
    get_extra(None, "answer_ids", "math")


def test_run_with_timeout_ok_error_timeout():
  assert run_with_timeout(lambda a, b: a + b, (1, 2), 1.0) == ("ok", 3)
  status, err = run_with_timeout(lambda: 1 / 0, (), 1.0)
  assert status == "error" and isinstance(err, ZeroDivisionError)
  t0 = time.monotonic()
  assert run_with_timeout(time.sleep, (1.0,), 0.1) == ("timeout", None)
  assert time.monotonic() - t0 < 0.9


def test_score_texts_scores_falls_back_and_raises():
  def check(c, a):
    if c == "slow":
      time.sleep(0.5)
    if c == "bad":
      raise RuntimeError("boom")
    return float(c == a)

  out = score_texts(check, ["x", "y", "bad", "slow"], ["x", "x", "x", "x"], timeout_s=0.1,
                    fallback=-1.0)
  np.testing.assert_array_equal(out, np.array([1.0, 0.0, -1.0, -1.0], np.float32))
  with pytest.raises(Exception, match="timeout_s=0.1.*row 0"):
    score_texts(check, ["slow"], [None], timeout_s=0.1, fallback=None)
  with pytest.raises(Exception, match="RuntimeError: boom"):
    score_texts(check, ["bad"], [None], timeout_s=0.5, fallback=None)
