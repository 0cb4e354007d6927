"""The KV-cache sampler: log-prob consistency with teacher forcing, padding and batch
invariance, groups, EOS handling, exact first-token distribution, and a 2x4 CPU mesh."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models as M
from rlhf_jax.sampling import SamplingConfig, sample
from tests.test_sampling_methods import reference_q

VOCAB = 16
TINY_LLAMA = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 64, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
              "rope_theta": 10000.0, "tie_word_embeddings": False}


def _build():
  model = M.from_config(TINY_LLAMA, dtype=jnp.float32, param_dtype=jnp.float32)
  return model, model.init(jax.random.key(0)), M.token_logps


MODEL, PARAMS, TOKEN_LOGPS = _build()
run = jax.jit(sample, static_argnums=(0, 5))
teacher = jax.jit(lambda p, ids, m: TOKEN_LOGPS(MODEL, p, ids, m)[0])
logits_fn = jax.jit(lambda p, ids, m: MODEL.apply(p, ids, attention_mask=m))

# Mixed-length prompts, left-padded (pad id 0); lengths 5, 2, 4, 3.
LEFT_IDS = np.array([[3, 4, 5, 6, 7], [0, 0, 0, 9, 2], [0, 11, 12, 13, 14], [0, 0, 15, 8, 6]],
                    np.int32)
NP = len(LEFT_IDS)
LEFT_MASK = LEFT_IDS != 0


def _right(ids, mask):
  n = mask.sum(1)
  out_ids, out_mask = np.zeros_like(ids), np.zeros_like(mask)
  for r in range(len(ids)):
    out_ids[r, :n[r]] = ids[r][mask[r]]
    out_mask[r, :n[r]] = True
  return out_ids, out_mask


RIGHT_IDS, RIGHT_MASK = _right(LEFT_IDS, LEFT_MASK)
GREEDY = SamplingConfig(max_new_tokens=6, temperature=0.0, eos_ids=(1,), pad_id=0, num_samples=3)
STOCH = SamplingConfig(max_new_tokens=6, temperature=0.9, top_k=8, top_p=0.9, eos_ids=(1,),
                       pad_id=0, num_samples=3)
PLAIN = SamplingConfig(max_new_tokens=6, temperature=1.0, eos_ids=(1,), pad_id=0, num_samples=3)


@functools.lru_cache(maxsize=None)
def _sampled(config, padding="left", seed=0):
  ids, mask = (LEFT_IDS, LEFT_MASK) if padding == "left" else (RIGHT_IDS, RIGHT_MASK)
  return run(MODEL, PARAMS, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(seed), config)


def _check_structure(out, config):
  n, t = NP * config.num_samples, config.max_new_tokens
  assert out.completion_ids.shape == (n, t) and out.logps.shape == (n, t)
  mask, tok = np.asarray(out.completion_mask), np.asarray(out.completion_ids)
  lengths = np.asarray(out.lengths)
  np.testing.assert_array_equal(lengths, mask.sum(1))
  for r in range(n):
    assert mask[r, :lengths[r]].all() and not mask[r, lengths[r]:].any()
    assert (tok[r, lengths[r]:] == config.pad_id).all()
    eos_at = np.flatnonzero(np.isin(tok[r, :lengths[r]], config.eos_ids))
    finished = bool(out.finished[r])
    assert finished == (eos_at.size == 1 and eos_at[0] == lengths[r] - 1), (r, tok[r])
    assert finished or lengths[r] == t
  np.testing.assert_array_equal(np.asarray(out.prompt_ids), np.repeat(LEFT_IDS, config.num_samples, 0))


def _teacher_logps(out):
  ids = jnp.concatenate([out.prompt_ids, out.completion_ids], 1)
  mask = jnp.concatenate([out.prompt_mask, out.completion_mask], 1)
  p = out.prompt_ids.shape[1]
  return np.asarray(teacher(PARAMS, ids, mask))[:, p:], ids, mask


@pytest.mark.parametrize("config", [GREEDY, STOCH, PLAIN], ids=["greedy", "truncated", "plain"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_logps_equal_teacher_forced(config, padding):
  out = _sampled(config, padding)
  _check_structure(out, config)
  lp, _, _ = _teacher_logps(out)
  mask = np.asarray(out.completion_mask)
  np.testing.assert_allclose(np.where(mask, lp, 0.0), np.asarray(out.logps), atol=1e-5)
  assert np.all(np.asarray(out.logps)[~mask] == 0)


def test_right_padding_is_normalised_to_left():
  a, b = _sampled(STOCH, "left"), _sampled(STOCH, "right")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def test_sampling_logps_are_log_of_truncated_distribution():
  out = _sampled(STOCH)
  _, ids, mask = _teacher_logps(out)
  logits = np.asarray(logits_fn(PARAMS, ids, mask), np.float64)
  p, t = out.prompt_ids.shape[1], STOCH.max_new_tokens
  tok, cmask = np.asarray(out.completion_ids), np.asarray(out.completion_mask)
  slogp = np.asarray(out.sampling_logps)
  for j in range(t):
    q = reference_q(logits[:, p + j - 1], STOCH.temperature, STOCH.top_k, STOCH.top_p)
    qt = q[np.arange(len(tok)), tok[:, j]]
    assert np.all(qt[cmask[:, j]] > 0)
    np.testing.assert_allclose(np.log(qt[cmask[:, j]]), slogp[cmask[:, j], j], atol=2e-5)
  # temperature 1 without truncation: the sampled distribution is the policy.
  plain = _sampled(PLAIN)
  np.testing.assert_allclose(np.asarray(plain.sampling_logps), np.asarray(plain.logps), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(_sampled(GREEDY).sampling_logps), 0.0)


def test_groups_are_contiguous_and_distinct():
  out = _sampled(PLAIN)
  tok = np.asarray(out.completion_ids).reshape(NP, 3, -1)
  distinct = [len({tuple(r) for r in group}) for group in tok]
  assert max(distinct) > 1  # samples of one prompt differ
  greedy = np.asarray(_sampled(GREEDY).completion_ids).reshape(NP, 3, -1)
  np.testing.assert_array_equal(greedy[:, 0], greedy[:, 1]); np.testing.assert_array_equal(greedy[:, 0], greedy[:, 2])  # greedy: all G identical


def test_batch_invariance():
  """A prompt sampled alone (with its batch index) equals its rows in a padded batch."""
  full = _sampled(STOCH)
  for i in (2,):
    n = int(LEFT_MASK[i].sum())
    ids = jnp.asarray(LEFT_IDS[i:i + 1, -n:])
    alone = run(MODEL, PARAMS, ids, jnp.ones_like(ids, bool), jax.random.key(0), STOCH,
                prompt_index=jnp.array([i]))
    rows = slice(3 * i, 3 * i + 3)
    np.testing.assert_array_equal(np.asarray(alone.completion_ids), np.asarray(full.completion_ids)[rows])
    np.testing.assert_array_equal(np.asarray(alone.completion_mask), np.asarray(full.completion_mask)[rows])
    np.testing.assert_allclose(np.asarray(alone.logps), np.asarray(full.logps)[rows], atol=1e-5)
    np.testing.assert_allclose(np.asarray(alone.sampling_logps),
                               np.asarray(full.sampling_logps)[rows], atol=1e-5)


def test_early_exit_when_every_token_is_eos():
  config = SamplingConfig(max_new_tokens=5, temperature=1.0, eos_ids=tuple(range(VOCAB)),
                          pad_id=0, num_samples=2)
  out = run(MODEL, PARAMS, jnp.asarray(LEFT_IDS), jnp.asarray(LEFT_MASK), jax.random.key(1), config)
  np.testing.assert_array_equal(np.asarray(out.lengths), 1)
  assert np.asarray(out.finished).all()
  assert (np.asarray(out.completion_ids)[:, 1:] == 0).all()


def test_first_token_distribution_through_sample():
  """4000 samples of one prompt: first-token frequencies within 5 s.e. of the exact q."""
  config = SamplingConfig(max_new_tokens=1, temperature=0.8, top_k=6, top_p=0.85, num_samples=4000)
  ids = jnp.asarray(LEFT_IDS[:1])
  out = run(MODEL, PARAMS, ids, jnp.ones_like(ids, bool), jax.random.key(5), config)
  logits = np.asarray(logits_fn(PARAMS, ids, jnp.ones_like(ids, bool)), np.float64)[:, -1]
  q = reference_q(logits, 0.8, 6, 0.85)[0]
  freq = np.bincount(np.asarray(out.completion_ids)[:, 0], minlength=VOCAB) / 4000
  se = np.sqrt(q * (1 - q) / 4000)
  assert np.all(np.abs(freq - q) <= 5 * se + 1e-12), (freq, q)
  assert (q > 0).sum() >= 2  # the test exercises a real distribution
  np.testing.assert_allclose(np.asarray(out.sampling_logps)[:, 0],
                             np.log(q[np.asarray(out.completion_ids)[:, 0]]), atol=2e-5)


def test_mesh_2x4_matches_single_device():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 (fake CPU) devices from tests/conftest.py")
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  ids, mask = LEFT_IDS, LEFT_MASK  # B = 4, divisible by the data axis
  batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  rules = {"heads": "model", "mlp": "model", "vocab": "model"}  # tensor-parallel params
  param_sh = jax.tree.map(
      lambda axes: jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec(*(rules.get(a) for a in axes))),
      M.logical_axes(MODEL), is_leaf=lambda x: isinstance(x, tuple))
  ref = _sampled(STOCH)
  with jax.set_mesh(mesh):
    params = jax.device_put(PARAMS, param_sh)
    sharded = jax.jit(sample, static_argnums=(0, 5))(
        MODEL, params, jax.device_put(ids, batch_sh), jax.device_put(mask, batch_sh),
        jax.random.key(0), STOCH)
  assert len(sharded.completion_ids.sharding.device_set) == 8
  assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(params))
  np.testing.assert_array_equal(np.asarray(sharded.completion_ids), np.asarray(ref.completion_ids))
  np.testing.assert_allclose(np.asarray(sharded.logps), np.asarray(ref.logps), atol=1e-5)
  np.testing.assert_allclose(np.asarray(sharded.sampling_logps), np.asarray(ref.sampling_logps),
                             atol=1e-5)


def test_bad_inputs_name_the_argument():
  with pytest.raises(ValueError, match="prompt_mask"):
    sample(MODEL, PARAMS, jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 4), bool), jax.random.key(0), GREEDY)
  with pytest.raises(ValueError, match="prompt_ids"):
    sample(MODEL, PARAMS, jnp.zeros((3,), jnp.int32), jnp.ones((3,), bool), jax.random.key(0), GREEDY)
  with pytest.raises(ValueError, match="prompt_index"):
    sample(MODEL, PARAMS, jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3), bool), jax.random.key(0),
           GREEDY, prompt_index=jnp.arange(3))
