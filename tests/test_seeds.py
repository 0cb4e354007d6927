"""Seed sweeps in one compiled program: the vmapped step and loop equal single-seed runs."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from rlhf_jax import demo, models
from rlhf_jax import sharding as sharding_lib
from rlhf_jax.train import adapters, online, online_loop, seeds
from test_online import prompts, setup


def test_vmapped_step_of_four_seeds_equals_four_single_steps():
  model, settings, sc, opt, rewards, state = setup()
  single = online.make_update(model, rewards, opt, settings, sc, donate=False)
  swept = seeds.vmapped(online.make_update(model, rewards, opt, settings, sc, jit=False),
                        donate=False)
  keys = [jax.random.PRNGKey(s) for s in range(4)]
  batches = [prompts(n=4, seed=s) for s in range(4)]
  states = [jax.tree.map(lambda x, s=s: x + 0.01 * s if x.dtype == np.float32 else x, state)
            for s in range(4)]  # different params per seed
  stacked = seeds.stack(states)
  batch = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
  for _ in range(2):
    want = [single(st, b, k) for st, b, k in zip(states, batches, keys)]
    stacked, metrics = swept(stacked, batch, jax.numpy.stack(keys))
    states = [w[0] for w in want]
    for i, (_, m) in enumerate(want):
      for k in ("reward_mean", "pg_loss", "kl", "entropy", "grad_norm"):
        np.testing.assert_allclose(np.asarray(metrics[k])[i], np.asarray(m[k]), atol=1e-5,
                                   err_msg=k)
      for a, b in zip(jax.tree.leaves(seeds.unstack(stacked.params, i)),
                      jax.tree.leaves(states[i].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  assert swept._cache_size() == 1  # pylint: disable=protected-access


def test_vmapped_lora_step_with_scanned_layers_equals_single_steps():
  """Two seeds of a LoRA step with stacked layers scanned in every pass (the sampler's
  in-place stacked cache and attached adapters included): the vmapped step equals the
  single-seed steps."""
  model, settings, sc, opt, rewards, state = setup()
  sc = dataclasses.replace(sc, scan_layers=True)
  base = models.stack_layers(state.params)
  spec = adapters.from_config({"lora": dict(rank=2, alpha=4.0, targets=("q_proj", "v_proj"))},
                              model, settings)
  st = online.init_state(adapters.init_adapters(spec, model, base), opt,
                         jax.random.PRNGKey(1), settings, ref_params=base, unroll_layers=False)
  assert isinstance(st.ref_params["layers"], dict)  # stacked
  single = online.make_update(model, rewards, opt, settings, sc, donate=False, lora=spec)
  swept = seeds.vmapped(online.make_update(model, rewards, opt, settings, sc, jit=False,
                                           lora=spec), donate=False)
  states = [st.replace(params=jax.tree.map(lambda x, s=s: x + 0.05 * (s + 1), st.params))
            for s in range(2)]  # moved adapters, different per seed
  keys = [jax.random.PRNGKey(s) for s in range(2)]
  batches = [prompts(n=4, seed=s) for s in range(2)]
  want = [single(x, b, k)[1] for x, b, k in zip(states, batches, keys)]
  _, metrics = swept(seeds.stack(states), {k: np.stack([b[k] for b in batches])
                                           for k in batches[0]}, jax.numpy.stack(keys))
  for i, m in enumerate(want):
    for k in ("reward_mean", "pg_loss", "kl", "grad_norm"):
      np.testing.assert_allclose(np.asarray(metrics[k])[i], np.asarray(m[k]), atol=1e-5,
                                 err_msg=k)
  assert float(np.asarray(want[0]["kl"])) != 0.0  # the adapters act


def test_seeds_over_the_mesh_data_axis_equal_seeds_on_one_device():
  """4 seeds over data=2 (2 per data slice), each seed's state over fsdp=2 x tensor=2 and its
  prompts over fsdp: the same metrics and parameters as the unsharded vmapped step."""
  assert jax.device_count() == 8
  model, settings, sc, opt, rewards, state = setup()
  states = [jax.tree.map(lambda x, s=s: x + 0.01 * s if x.dtype == np.float32 else x, state)
            for s in range(4)]
  keys = jax.numpy.stack([jax.random.PRNGKey(s) for s in range(4)])
  batches = [prompts(n=4, seed=s) for s in range(4)]
  batch = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
  plain = seeds.vmapped(online.make_update(model, rewards, opt, settings, sc, jit=False),
                        donate=False)
  mesh = sharding_lib.make_mesh(data=2, fsdp=2, tensor=2)
  put_state, put_batch, out_sh = seeds.mesh_placement(mesh, seeds.stack(states))
  swept = seeds.vmapped(online.make_update(model, rewards, opt, settings, sc, jit=False),
                        donate=False, out_shardings=out_sh)
  want, got = seeds.stack(states), put_state(seeds.stack(states))
  assert all(x.sharding.spec[0] == "data" for x in jax.tree.leaves(got.params))
  assert any({"fsdp", "tensor"} & set(x.sharding.spec[1:]) for x in jax.tree.leaves(got.params))
  for _ in range(2):
    want, m_want = plain(want, batch, keys)
    got, m_got = swept(got, put_batch(batch), keys)
    for k in ("reward_mean", "pg_loss", "kl", "entropy", "grad_norm"):
      np.testing.assert_allclose(np.asarray(m_got[k]), np.asarray(m_want[k]), atol=1e-5,
                                 err_msg=k)
  for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  assert all(x.sharding.spec[0] == "data" for x in jax.tree.leaves(got.params))
  assert swept._cache_size() == 1  # pylint: disable=protected-access


def test_loop_runs_seeds_over_the_mesh(tmp_path):
  c = _cfg(tmp_path, "mesh", seeds=2, mesh=dict(data=2, fsdp=4, tensor=1))
  c.train.steps, c.sft.steps = 1, 0
  out = online_loop.train(c)
  assert len(out["accuracy_after"]) == 2
  assert sorted({r["seed"] for r in _rows(tmp_path / "mesh")}) == [0, 1]
  assert all(x.sharding.spec[0] == "data" and len(x.sharding.device_set) == 8
             for x in jax.tree.leaves(out["state"].params))


@pytest.mark.parametrize("n,prompts_per_step,match", [
    (3, 32, r"data axis, whose size 2 must divide config\.seeds"),
    (2, 6, r"train\.prompts_per_step=6 is not divisible by the mesh's fsdp = 4"),
])
def test_seeds_on_a_mesh_that_does_not_fit_are_named(tmp_path, n, prompts_per_step, match):
  c = _cfg(tmp_path, "bad", seeds=n, mesh=dict(data=2, fsdp=4, tensor=1))
  c.train.prompts_per_step = prompts_per_step
  with pytest.raises(ValueError, match=match):
    online_loop.train(c)
  assert not (tmp_path / "bad").exists()


def _cfg(tmp_path, name, **kw):
  c = demo.get_config("runlocal")
  c.workdir = str(tmp_path / name)
  c.train.steps, c.sft.steps, c.data.eval_size = 2, 2, 8
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def _rows(path):
  rows = [json.loads(line) for line in open(path / "metrics.jsonl")]
  return [r for r in rows if "reward_mean" in r]


def test_loop_with_two_seeds_equals_two_single_seed_runs(tmp_path):
  swept = online_loop.train(_cfg(tmp_path, "swept", seeds=2))
  singles = [online_loop.train(_cfg(tmp_path, f"s{s}", seed=s)) for s in (0, 1)]
  assert len(swept["accuracy_after"]) == 2
  rows = _rows(tmp_path / "swept")
  assert sorted({r["seed"] for r in rows}) == [0, 1]
  for s, single in enumerate(singles):
    assert swept["accuracy_before"][s] == pytest.approx(single["accuracy_before"], abs=1e-6)
    assert swept["accuracy_after"][s] == pytest.approx(single["accuracy_after"], abs=1e-6)
    mine = [r for r in rows if r["seed"] == s]
    theirs = _rows(tmp_path / f"s{s}")
    assert len(mine) == len(theirs) == 2
    for a, b in zip(mine, theirs):
      for k in ("reward_mean", "pg_loss", "kl", "entropy", "grad_norm", "response_length"):
        assert a[k] == pytest.approx(b[k], abs=1e-5), k
  assert (tmp_path / "swept" / "tb" / "seed_1").is_dir()
  assert (tmp_path / "swept" / "reward_curve.png").is_file()


@pytest.mark.parametrize("bad", [0, -1])
def test_a_bad_number_of_seeds_is_named(tmp_path, bad):
  with pytest.raises(ValueError, match=r"config\.seeds"):
    online_loop.train(_cfg(tmp_path, "bad", seeds=bad))
  assert not (tmp_path / "bad").exists()
