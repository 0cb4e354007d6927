"""Out-of-range loss hyper-parameters are a ValueError naming the loss, the parameter and
the allowed range (a silent sign flip or division by zero otherwise). The check runs before
any array is read, so the arrays here are placeholders."""

from __future__ import annotations

import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import common, kl, policy_gradient as pg, preference_aux as aux
from rlhf_jax.losses import preference_list as plist, preference_online as pon
from rlhf_jax.losses import reward_model as rm, reward_model_latent as rml

BAD = [  # (function, parameter, an out-of-range value, the range in the message)
    (aux.orpo, "lam", -0.1, ">= 0"),
    (aux.kto, "beta", 0.0, "> 0"),
    (aux.kto, "desirable_weight", -1.0, ">= 0"),
    (aux.kto, "undesirable_weight", -1.0, ">= 0"),
    (aux.discounted_logp_sum, "gamma", 1.5, "in [0, 1]"),
    (aux.cpl, "alpha", -0.1, "> 0"),
    (aux.cpl, "lam", -0.5, ">= 0"),
    (aux.cpl, "gamma", 1.5, "in [0, 1]"),
    (aux.vpo, "beta", 0.0, "> 0"),
    (aux.vpo, "alpha", -1.0, ">= 0"),
    (aux.sspo, "beta", -0.1, "> 0"),
    (aux.sspo, "weight", -0.1, ">= 0"),
    (aux.treg, "beta", 0.0, "> 0"),
    (aux.treg, "alpha", -0.25, ">= 0"),
    (aux.power_dl, "beta", 0.0, "> 0"),
    (aux.power_dl, "eta", -0.1, ">= 0"),
    (aux.power_dl_update_labels, "gamma", -0.1, "in [0, 1]"),
    (plist.pro, "temperature", 0.0, "> 0"),
    (plist.pro, "sft_weight", -0.05, ">= 0"),
    (plist.grao, "beta", -0.5, ">= 0"),
    (plist.grao, "lam", -0.6, ">= 0"),
    (plist.grao, "eps", 0.0, "> 0"),
    (plist.trpa, "beta", 0.0, "> 0"),
    (plist.trpa, "best_level_scale", -2.5, "> 0"),
    (plist.trpa, "kl_coef", -1e-3, ">= 0"),
    (pon.copg, "beta", 0.0, "> 0"),
    (pon.dno, "eta", -0.1, "> 0"),
    (pon.inpo, "eta", 0.0, "> 0"),
    (pon.inpo, "tau", -0.1, ">= 0"),
    (pon.nash_md_mixture_logits, "beta", 1.5, "in [0, 1]"),
    (pon.nash_md, "tau", -0.008, ">= 0"),
    (pon.rso_sample, "beta", 0.0, "> 0"),
    (pg.clipped_surrogate, "epsilon_low", -0.2, ">= 0"),
    (pg.ppo_clip, "epsilon_low", -0.2, ">= 0"),
    (pg.ppo_clip, "epsilon_high", -0.28, ">= 0"),
    (pg.gspo, "epsilon_high", -4e-4, ">= 0"),
    (pg.cispo, "epsilon_high", -0.2, ">= 0"),
    (pg.sapo, "tau_neg", 0.0, "> 0"),
    (pg.opmd, "tau", -0.1, ">= 0"),
    (pg.dro, "tau", -0.1, ">= 0"),
    (pg.rover_loss, "rho", 0.0, "> 0"),
    (pg.value_loss, "clip_range", 0.0, "> 0"),
    (pg.token_mismatch_weights, "cap", 0.0, "> 0"),
    (pg.sequence_mismatch_weights, "lower", -1.0, ">= 0"),
    (kl.k3, "clamp", -1.0, "> 0"),
    (kl.kl_in_reward, "beta", -0.05, ">= 0"),
    (kl.kl_in_loss, "beta", -0.05, ">= 0"),
    (kl.adaptive_kl_controller, "init_beta", -0.2, ">= 0"),
    (kl.fixed_kl_controller, "beta", -0.2, ">= 0"),
    (rm.bt, "center_coef", -0.01, ">= 0"),
    (rm.plackett_luce, "temperature", 0.0, "> 0"),
    (rm.bt_regression, "regression_coef", -1.0, ">= 0"),
    (rml.vpl, "kl_coef", -0.01, ">= 0"),
    (pg.ppo_clip, "epsilon_low", float("nan"), ">= 0"),  # NaN is out of every range
]


def _call(fn, **kwargs):
  """Calls `fn` with placeholder (None) arrays and `kwargs`."""
  sig = inspect.signature(fn)
  args = {n: None for n, p in sig.parameters.items()
          if p.default is inspect.Parameter.empty and n not in kwargs}
  return fn(**args, **kwargs)


@pytest.mark.parametrize("fn,name,value,want", BAD,
                         ids=[f"{f.__name__}-{n}-{v}" for f, n, v, _ in BAD])
def test_out_of_range_is_named(fn, name, value, want):
  with pytest.raises(ValueError) as e:
    _call(fn, **{name: value})
  msg = str(e.value)
  assert msg.startswith(f"{fn.__name__}: {name} must be {want}, got "), msg


def test_traced_hyper_parameter_passes():
  """A hyper-parameter traced under jit (e.g. a schedule) is not range-checked; the value
  equals the one with the concrete parameter."""
  logps = jnp.array([[-1.0, -2.0]])
  old = jnp.array([[-1.1, -1.5]])
  adv = jnp.array([1.0])
  mask = jnp.ones((1, 2), bool)
  traced = jax.jit(lambda e: pg.ppo_clip(logps, old, adv, mask, epsilon_low=e)[0])(0.2)
  np.testing.assert_allclose(traced, pg.ppo_clip(logps, old, adv, mask, epsilon_low=0.2)[0])


def test_boundary_values_pass():
  """The range ends that mean "off" are allowed: no KL, no clip width, no extra weight."""
  logps = jnp.array([[-1.0, -2.0]])
  mask = jnp.ones((1, 2), bool)
  kl.kl_in_loss(logps, mask, beta=0.0)
  pg.ppo_clip(logps, logps, jnp.array([1.0]), mask, epsilon_low=0.0)
  pon.nash_md(jnp.array([-1.0]), jnp.array([-1.0]), jnp.array([0.7]), tau=0.0)


ESTIMATOR_BAD = [  # advantage estimators: (name, parameter, out-of-range value, range)
    ("gae", "lam", 1.5, "in [0, 1]"),
    ("gae", "gamma", -0.1, "in [0, 1]"),
    ("reinforce_pp", "gamma", 2.0, "in [0, 1]"),
    ("rover", "rho", -1.0, ">= 0"),
    ("grpo", "eps", -1e-6, ">= 0"),
    ("w_reinforce", "negative_weight", -1.0, ">= 0"),
    ("adora", "weight", -0.1, ">= 0"),
    ("thr", "p", 1.5, "in [-1, 1]"),
    ("grpo_thr", "eps", -1.0, ">= 0"),
    ("grpo_ragged", "eps", -1.0, ">= 0"),
    ("copo", "k", 0.0, "> 0"),
    ("bnpo", "max_inverse_density", 0.0, "> 0"),
]


@pytest.mark.parametrize("name,param,value,want", ESTIMATOR_BAD,
                         ids=[f"{n}-{p}-{v}" for n, p, v, _ in ESTIMATOR_BAD])
def test_estimator_out_of_range_is_named(name, param, value, want):
  from rlhf_jax import advantages  # pylint: disable=import-outside-toplevel
  fn = advantages.get(name)
  with pytest.raises(ValueError) as e:
    _call(fn, **{param: value})
  assert str(e.value).startswith(f"{name}: {param} must be {want}, got "), str(e.value)


def test_reward_transform_out_of_range_is_named():
  from rlhf_jax.rewards import ensemble, shaping, shaping_state  # pylint: disable=import-outside-toplevel
  cases = [(ensemble.uwo, "coef", -0.1, ">= 0"),
           (shaping.length_penalty, "coef", -0.01, ">= 0"),
           (shaping.cosine_similarity_reward, "eps", 0.0, "> 0"),
           (shaping_state.lagrangian_multipliers, "lr", 0.0, "> 0"),
           (shaping_state.dynamic_reward_weights, "lr", -0.1, "> 0"),
           (shaping_state.dynamic_reward_weights, "min_weight", -0.1, ">= 0")]
  for fn, name, value, want in cases:
    with pytest.raises(ValueError) as e:
      _call(fn, **{name: value})
    assert str(e.value).startswith(f"{fn.__name__}: {name} must be {want}, got "), str(e.value)


def test_check_helpers_bounds_and_what_passes():
  """check_range / check_positive / check_nonnegative / check_unit_interval: the bounds
  themselves, NaN, and the values that are not checked (None, arrays, tracers)."""
  common.check_positive("m", a=1e-12)
  common.check_nonnegative("m", a=0.0)
  common.check_unit_interval("m", a=0.0, b=1.0)
  for fn, value, want in ((common.check_positive, 0.0, "> 0"),
                          (common.check_nonnegative, -1e-12, ">= 0"),
                          (common.check_unit_interval, 1.0000001, "in [0, 1]"),
                          (common.check_unit_interval, float("nan"), "in [0, 1]")):
    with pytest.raises(ValueError, match=rf"^m: a must be {re.escape(want)}, got "):
      fn("m", a=value)
  with pytest.raises(ValueError, match=r"^m: a must be odd, got 2"):
    common.check_range("m", "a", 2, lambda v: v % 2 == 1, "odd")
  common.check_positive("m", a=None, b=jnp.array([-1.0, 2.0]))  # not scalars: not checked
  with pytest.raises(ValueError, match="m: a must be > 0"):
    common.check_positive("m", a=jnp.float32(-1.0))  # a concrete 0-d array is checked
  jax.jit(lambda x: common.check_positive("m", a=x) or x)(-1.0)  # traced: not checked
