"""A trained reward model scoring inside the fused RL step: the reward function against a
direct forward pass, padding invariance, export from the offline loop, loading by config."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from offline_testlib import run_config as run_offline
from rlhf_jax import demo, models, rewards
from rlhf_jax.train import build, offline_config, online_loop

HF = dict(model_type="llama", vocab_size=16, hidden_size=16, num_hidden_layers=1,
          num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
          max_position_embeddings=32)


def _rm():
  model = models.from_config(HF, head="reward")
  return model, model.init(jax.random.PRNGKey(3))


def test_reward_is_the_model_score_of_prompt_and_completion_and_ignores_padding():
  model, params = _rm()
  fn = jax.jit(rewards.reward_model(model, params))
  rng = np.random.RandomState(0)
  prompt = rng.randint(1, 16, (2, 4)).astype(np.int32)
  completion = rng.randint(1, 16, (2, 5)).astype(np.int32)
  cmask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  got = fn(prompt, completion, cmask, {"prompt_mask": np.ones((2, 4), bool)})
  for i in range(2):  # the unpadded sequence, scored directly
    seq = np.concatenate([prompt[i], completion[i][cmask[i]]])[None]
    np.testing.assert_allclose(float(got[i]), float(model.apply(params, seq)[0]), rtol=1e-5,
                               atol=1e-6)
  # Two more left pads in the prompts (pad id 0): same rewards.
  padded = np.concatenate([np.zeros((2, 2), np.int32), prompt], axis=1)
  pmask = np.concatenate([np.zeros((2, 2), bool), np.ones((2, 4), bool)], axis=1)
  np.testing.assert_allclose(fn(padded, completion, cmask, {"prompt_mask": pmask}), got,
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(KeyError, match=r"reward_model needs batch_extras\['prompt_mask'\]"):
    fn(prompt, completion, cmask, {})
  # No gradient reaches the reward model's parameters.
  g = jax.grad(lambda p: jnp.sum(rewards.reward_model(model, p)(
      prompt, completion, cmask, {"prompt_mask": np.ones((2, 4), bool)})))(params)
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(g))


def test_loading_a_checkpoint_without_a_score_head_is_an_error(tmp_path):
  lm = models.from_config(HF)
  models.save_hf(str(tmp_path), lm, lm.init(jax.random.PRNGKey(0)))
  with pytest.raises(ValueError, match="has no 'score.weight': it is not a trained reward"):
    models.load_hf(str(tmp_path), head="reward", require_score=True)
  tok = build.build_tokenizer({})
  with pytest.raises(ValueError, match="reward 'reward_model' needs the key 'path'"):
    build.build_reward_fns([{"name": "reward_model"}], tok)
  model, params = _rm()  # vocabulary 16 < the char tokenizer's
  models.save_hf(str(tmp_path / "rm"), model, params)
  with pytest.raises(ValueError, match=rf"has vocab_size=16 but the run's tokenizer has "
                                       rf"{tok.vocab_size} ids"):
    build.build_reward_fns(["exact_match", {"name": "reward_model", "path": str(tmp_path / "rm")}],
                           tok)


def test_offline_reward_model_exported_then_scoring_the_online_step(tmp_path):
  c = offline_config.synthetic_config("reward_model", loss="bt", arg="fast")
  c.workdir, c.export_hf, c.train.steps = str(tmp_path / "rm"), True, 3
  s = run_offline(c)
  path = s["hf_model"]
  assert path == os.path.join(c.workdir, "hf_model")
  model, params = models.load_hf(path, require_score=True)
  assert model.head == "reward"
  for a, b in zip(jax.tree.leaves(models.stack_layers(s["state"].params)),
                  jax.tree.leaves(params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=0)

  o = demo.get_config("runlocal")
  o.workdir = str(tmp_path / "rl")
  o.rewards = ["exact_match", {"name": "reward_model", "path": path}]
  o.rl.reward_weights = (1.0, 0.5)
  o.export_hf = True
  out = online_loop.train(o)
  rows = [json.loads(line) for line in open(tmp_path / "rl" / "metrics.jsonl")]
  r1 = [r["reward_1_mean"] for r in rows if "reward_1_mean" in r]
  assert len(r1) == o.train.steps and np.all(np.isfinite(r1))
  assert len(set(np.round(r1, 6))) > 1  # scores differ between steps' samples
  policy, _ = models.load_hf(out["hf_model"])
  assert policy.head == "lm"
