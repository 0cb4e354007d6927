"""CI check of experiments/guess_number: a tiny variant, two vmapped RL steps of GRPO, of
GiGPO and of IGPO from the same warm start on the same batches. The rollouts match, the updates do not
(the estimators differ), metrics are finite, and each method's step compiles once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import _toylib

# No warm-up: with one token per turn any digit is a guess, so the random model finds the
# number now and then and the advantages are not all zero.
ARG = ("fast,seeds=2,max_value=9,max_turns=4,turn_tokens=1,sft_steps=0,prompts_per_step=8,"
       "run_methods=grpo+gigpo+igpo")


@pytest.fixture(scope="module")
def trained():
  cfg, exp = _toylib.load_experiment("guess_number", ARG)
  s = exp.make_setup(cfg)
  seeds = [0, 1]
  params = [exp.warm_start(s, sd) for sd in seeds]
  out = {}
  for name in ("grpo", "gigpo", "igpo"):
    method = exp.make_method(s, cfg.methods[name])
    _, hist, _ = exp.run_rl(s, method, params, seeds)
    out[name] = (method, hist)
  return cfg, exp, s, params, out


def test_config_variants():
  cfg, _ = _toylib.load_experiment("guess_number", "full")
  assert cfg.seeds >= 3 and cfg.methods["gigpo"]["advantage"] == "gigpo"
  assert cfg.methods["grpo"]["advantage"] == "grpo"
  assert {k: v for k, v in cfg.methods["grpo"].items() if k != "advantage"} == {
      k: v for k, v in cfg.methods["gigpo"].items() if k != "advantage"}  # same budget
  assert cfg.model["hf_config"]["max_position_embeddings"] == 72  # the README's 4-turn runs
  # A longer turn budget gets the positions its episodes need (the README's 7-turn run).
  long = _toylib.load_experiment("guess_number", "full,max_value=16,max_turns=7")[0]
  episode = len(long.prompt) + 7 * (long.env["turn_tokens"] + long.env["obs_tokens"])
  assert long.model["hf_config"]["max_position_embeddings"] >= episode > 72
  with pytest.raises(ValueError, match="variant must be 'fast' or 'full'"):
    _toylib.load_experiment("guess_number", "ful")
  with pytest.raises(ValueError, match="'gipo' is unknown"):
    _toylib.load_experiment("guess_number", "full,run_methods=grpo+gipo")


def test_two_steps_of_each_method(trained):
  cfg, _, _, _, out = trained
  for name, ((_, _, update), hist) in out.items():
    assert len(hist) == 2
    for m in hist:
      for k, v in m.items():
        assert np.all(np.isfinite(v)), (name, k)
      assert m["num_turns"].shape == (cfg.seeds,)
    assert update._cache_size() == 1, name  # pylint: disable=protected-access
  g0, s0 = out["grpo"][1][0], out["gigpo"][1][0]
  # Same start, same keys, same batch: the same episodes ...
  for k in ("env_reward_mean", "num_turns", "env_done_fraction", "response_length"):
    np.testing.assert_array_equal(g0[k], s0[k])
  assert g0["env_reward_mean"].max() > 0  # the number is found now and then
  # ... but another estimator, so another loss.
  assert np.abs(g0["pg_loss"] - s0["pg_loss"]).max() > 1e-6
  i0 = out["igpo"][1][0]
  np.testing.assert_array_equal(g0["num_turns"], i0["num_turns"])
  assert np.abs(g0["pg_loss"] - i0["pg_loss"]).max() > 1e-6


def test_gigpo_advantages_differ_from_grpo_on_one_batch(trained):
  _, exp, s, params, _ = trained
  batch = {k: jnp.asarray(v) for k, v in exp.prompt_batch(s, list(range(1, 10)) * 2).items()}
  adv, info = jax.jit(lambda p: exp.step_advantages(s, p, batch, jax.random.PRNGKey(3)))(
      params[0])
  grpo, gigpo = np.asarray(adv["grpo"]), np.asarray(adv["gigpo"])
  assert np.all(np.isfinite(grpo)) and np.all(np.isfinite(gigpo))
  assert np.asarray(info.reward).std() > 0 and np.abs(grpo).max() > 0
  assert np.abs(grpo - gigpo).max() > 1e-3
  # GRPO gives every token of an episode one value; GiGPO's vary between its turns.
  distinct = lambda a: [len(np.unique(row[row != 0])) for row in a]  # noqa: E731
  assert max(distinct(grpo)) == 1 and max(distinct(gigpo)) > 1
