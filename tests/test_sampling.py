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


# ----------------------------------------------------------------------------- padded vocab

# A checkpoint's vocabulary padded beyond its tokenizer's: 96 model rows, the character
# tokenizer's 84 ids. `vocab_limit` keeps ids 84..95 out of the samples and the log-probs.
PAD_VOCAB = 96
PADDED = M.from_config(dict(TINY_LLAMA, vocab_size=PAD_VOCAB, num_hidden_layers=1))


def _padded_params(boost: float = 0.0):
  """Random weights; `boost` > 0 makes the padded rows' logits the largest (LM-head columns
  84..95 = boost x columns 0..11), so a greedy decode without the limit picks them."""
  from rlhf_jax.data import CharTokenizer  # pylint: disable=import-outside-toplevel
  real = CharTokenizer().vocab_size
  params = PADDED.init(jax.random.key(1))
  if boost:
    w = params["lm_head"]
    extra = PAD_VOCAB - real
    params = dict(params, lm_head=w.at[..., real:].set(boost * w[..., :extra]))
  return params, real


def _padded_sample(params, config, seed=0):
  prompts = jnp.asarray(np.tile(LEFT_IDS, (4, 1)))
  return run(PADDED, params, prompts, prompts != 0, jax.random.key(seed), config)


@pytest.mark.parametrize("top_k", [None, 40], ids=["plain", "top_k"])
def test_vocab_limit_never_samples_padded_ids_and_logps_match_the_trainer(top_k):
  params, real = _padded_params()
  base = SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=top_k, eos_ids=(2,), pad_id=0,
                        num_samples=8)
  unlimited = _padded_sample(params, base)
  # 16 prompts x 8 samples x 8 tokens: without the limit ~1/8 of the draws are padded ids.
  assert (np.asarray(unlimited.completion_ids) >= real).any()
  limited_cfg = SamplingConfig(**dict(base.__dict__, vocab_limit=real))
  for seed in range(3):
    out = _padded_sample(params, limited_cfg, seed)
    ids, mask = np.asarray(out.completion_ids), np.asarray(out.completion_mask)
    assert ids.max() < real, f"sampled id {ids.max()} >= vocab_limit={real}"
  # Sampler log-probs = trainer log-probs over the real vocabulary (both trainer paths).
  full_ids = jnp.concatenate([out.prompt_ids, out.completion_ids], 1)
  full_mask = jnp.concatenate([out.prompt_mask, out.completion_mask], 1)
  p = out.prompt_ids.shape[1]
  lp, ent = M.token_logps(PADDED, params, full_ids, full_mask, vocab_limit=real)
  np.testing.assert_allclose(np.where(mask, np.asarray(lp)[:, p:], 0), np.asarray(out.logps),
                             atol=1e-5)
  g = limited_cfg.num_samples
  lp2, ent2 = M.completion_logps(PADDED, params, out.prompt_ids[::g], out.prompt_mask[::g],
                                 out.completion_ids, out.completion_mask, group_size=g,
                                 vocab_limit=real)
  np.testing.assert_allclose(np.where(mask, lp2, 0), np.asarray(out.logps), atol=1e-5)
  np.testing.assert_allclose(np.where(mask, ent2, 0), np.where(mask, np.asarray(ent)[:, p:], 0),
                             atol=1e-5)
  # The limit changes the normaliser: without it the trainer disagrees with the sampler.
  lp_full, _ = M.token_logps(PADDED, params, full_ids, full_mask)
  assert np.abs(np.where(mask, np.asarray(lp_full)[:, p:], 0) - np.asarray(out.logps)).max() > 1e-3
  # Entropy over the real vocabulary, float64 reference; gradients stay finite.
  logits = np.asarray(PADDED.apply(params, full_ids, attention_mask=full_mask), np.float64)
  real_logits = logits[..., :real]
  q = np.exp(real_logits - real_logits.max(-1, keepdims=True))
  q /= q.sum(-1, keepdims=True)
  ref_ent = -(q * np.log(q)).sum(-1)
  np.testing.assert_allclose(np.asarray(ent)[:, 1:], ref_ent[:, :-1], atol=1e-4)
  grads = jax.grad(lambda pr: jnp.sum(M.token_logps(PADDED, pr, full_ids, full_mask,
                                                    vocab_limit=real)[0]))(params)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(grads))


def test_vocab_limit_greedy_decodes_only_real_ids():
  params, real = _padded_params(boost=10.0)
  greedy = SamplingConfig(max_new_tokens=6, temperature=0.0, eos_ids=(2,), pad_id=0,
                          num_samples=1)
  assert (np.asarray(_padded_sample(params, greedy).completion_ids) >= real).any()
  out = _padded_sample(params, SamplingConfig(**dict(greedy.__dict__, vocab_limit=real)))
  assert np.asarray(out.completion_ids).max() < real


def test_vocab_limit_is_validated():
  with pytest.raises(ValueError, match=r"SamplingConfig\.vocab_limit must be None or a positive "
                                       r"int .*got 0"):
    SamplingConfig(max_new_tokens=4, vocab_limit=0)
  with pytest.raises(ValueError, match=r"SamplingConfig\.eos_ids=\(90,\) is outside the "
                                       r"vocabulary of vocab_limit=84 tokens"):
    SamplingConfig(max_new_tokens=4, eos_ids=(90,), vocab_limit=84)
  with pytest.raises(ValueError, match=r"vocab_limit must be None or a positive int"):
    M.token_logps(PADDED, _padded_params()[0], jnp.zeros((1, 3), jnp.int32), vocab_limit=-1)
  # Without a limit (the default) nothing changes: same values as before.
  assert SamplingConfig(max_new_tokens=4).vocab_limit is None
