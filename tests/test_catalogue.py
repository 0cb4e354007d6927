"""Every catalogue method that runs from a config runs from it: two steps on a tiny model.

The overrides are applied as the command line applies them (`config_utils.apply_overrides`)
on the experiment config the catalogue names; the registered function of the method is
wrapped while the step is built and run, so the test fails if the config does not reach it.
The steps run eagerly (`jax.disable_jit`) except the model's passes, which stay compiled
(`compiled_model_passes`): the op-by-op programs and the model's programs (one per shape)
are shared by every entry, so the ~60 entries cost about as much as a few compiled steps;
the compiled step's own guarantees (one compilation, sharding, resume) are tested in
tests/test_online*.py. Multi-turn entries (`config.env`) run their step compiled.
docs/methods.md's table is the catalogue's (`python -m rlhf_jax.catalogue`).
"""

from __future__ import annotations

import contextlib
import importlib
import os

import jax
import numpy as np
import pytest

from rlhf_jax import advantages, catalogue, config_utils, losses
from rlhf_jax.models import model as model_lib
from rlhf_jax.rewards import transforms
from rlhf_jax.train import offline_loop, online_loop

ONLINE = [e for e in catalogue.CATALOGUE if e.run == "online"]
OFFLINE = [e for e in catalogue.CATALOGUE if e.run == "offline"]
REGISTRIES = {"loss": losses.REGISTRY, "advantage": advantages.REGISTRY,
              "transform": transforms.REGISTRY}
TINY = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=32)


@pytest.fixture(autouse=True)
def compiled_model_passes(monkeypatch):
  """Inside `jax.disable_jit`, the model's forward / decode passes still run as compiled
  programs (cached by shape across entries); everything else, the method's code included,
  runs op by op."""
  jitted = model_lib._jit_call  # pylint: disable=protected-access

  def call(*args):
    with jax.disable_jit(False):
      return jitted(*args)
  monkeypatch.setattr(model_lib, "_jit_call", call)


@contextlib.contextmanager
def spying(spy):
  """Records the calls of the registered function `spy = (registry, name)`."""
  calls = []
  if spy is None or spy[0] not in REGISTRIES:
    yield calls
    return
  registry = REGISTRIES[spy[0]]
  fn = registry.get(spy[1])

  def wrapper(*args, **kwargs):
    calls.append(1)
    return fn(*args, **kwargs)
  registry._fns[spy[1]] = wrapper  # pylint: disable=protected-access
  try:
    yield calls
  finally:
    registry._fns[spy[1]] = fn  # pylint: disable=protected-access


def _config(entry, tmp_path, arg):
  c = importlib.import_module(entry.base[:-3].replace("/", ".")).get_config(arg)
  c.workdir = str(tmp_path / "run")
  c.progress = False
  c.model.hf_config.update(TINY)
  config_utils.apply_overrides(c, catalogue.overrides(entry))
  return c


def _finite(metrics):
  bad = {k: v for k, v in metrics.items() if not np.all(np.isfinite(np.asarray(v, np.float64)))}
  assert not bad, bad


@pytest.mark.parametrize("entry", ONLINE, ids=[e.method for e in ONLINE])
def test_online_method_runs_from_its_config(entry, tmp_path):
  c = _config(entry, tmp_path, "runlocal")
  c.sft.steps, c.train.steps, c.train.prompts_per_step = 0, 2, 2
  c.rl.group_size = 4
  c.data.train_size, c.data.eval_size = 32, 4
  if "rewards" not in entry.config:  # a reward that varies within groups on a random model
    c.rewards = ("exact_match", "terminated")
  # A multi-turn entry compiles its step: its rollout brings hundreds of shapes of its own,
  # which cost more op by op than one compilation.
  eager = jax.disable_jit() if c.get("env") is None else contextlib.nullcontext()
  with spying(entry.spy) as calls, eager:
    built = online_loop.setup(c)
    value_model, value_opt, state = built.init_states(c, [r.params for r in built.runs])
    update = built.make_update(c, value_model, value_opt)
    batches = built.batches
    for step in range(2):
      batch = {k: jax.numpy.asarray(v) for k, v in next(batches).items()
               if np.asarray(v).dtype.kind in "biuf"}
      state, metrics = update(state, batch, jax.random.PRNGKey(step))
      _finite(jax.device_get(metrics))
  if entry.spy is not None and entry.spy[0] == "reward":
    assert entry.spy[1] in [r.name for r in built.rewards]
  elif entry.spy is not None:
    assert calls, f"{entry.spy} did not run"
  assert int(state.step) == 2
  assert not os.path.exists(c.workdir)  # building the step writes nothing


@pytest.mark.parametrize("entry", OFFLINE, ids=[e.method for e in OFFLINE])
def test_offline_method_runs_from_its_config(entry, tmp_path):
  c = _config(entry, tmp_path, "fast")
  c.train.steps, c.train.eval_every, c.train.batch_size = 2, 0, 8
  c.data.train_size, c.data.eval_size, c.data.eval_batch_size = 16, 8, 8
  offline_loop._compiled.cache_clear()  # pylint: disable=protected-access
  with spying(entry.spy) as calls, jax.disable_jit():
    summary = offline_loop.train(c)
  assert calls, f"{entry.spy} did not run"
  assert np.isfinite(summary["final_train_loss"])
  _finite(summary["eval_after"])


def test_count_and_docs_table_match_the_catalogue():
  counts = catalogue.count()
  print(f"\nrunnable from a config: {counts['runnable']}/{counts['total']} Tier A/B entries, "
        f"family 5: {counts['family5_runnable']}/{counts['family5']}")
  assert counts["runnable"] == len([e for e in catalogue.CATALOGUE
                                    if e.tier in "AB" and e.run is not None])
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(here, "docs", "methods.md"), encoding="utf-8") as f:
    assert catalogue.markdown() in f.read(), "regenerate: python -m rlhf_jax.catalogue"
  for e in catalogue.CATALOGUE:
    if e.test and e.test != "tests/test_catalogue.py":
      assert os.path.exists(os.path.join(here, e.test)), e.test
