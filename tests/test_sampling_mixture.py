"""Nash-MD geometric-mixture sampling inside the KV-cache sampler, against float64 numpy.

π_mix(y_t|·) ∝ π(y_t|·)^(1−β) π_ref(y_t|·)^β is computed explicitly from both models'
teacher-forced logits (V = 5); the sampler's returned log-probs must equal it, and the
empirical frequencies of whole completions must match its sequence probabilities.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from rlhf_jax import models as M
from rlhf_jax.sampling import SamplingConfig, sample, sample_mixture
from tests.test_sampling_methods import reference_q

VOCAB = 5
TINY = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 32,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": False}
MODEL = M.from_config(TINY, dtype=jnp.float32, param_dtype=jnp.float32)


def _params(seed):
  p = MODEL.init(jax.random.key(seed))
  # Sharper heads than the random init, so that π, π_ref and π_mix clearly differ.
  return {**p, "lm_head": p["lm_head"] * 2.0}


PARAMS, REF_PARAMS = _params(0), _params(1)
BETA = 0.4
# Left-padded prompts (pad 0) of lengths 4, 2, 3.
IDS = np.array([[1, 2, 3, 4], [0, 0, 4, 2], [0, 3, 1, 1]], np.int32)
MASK = IDS != 0
IDS[0, 0] = 0  # token id 0 is a real token in row 0 (the mask says so)
MASK[0, 0] = True
# One compiled sampler serves the log-prob, frequency and β = 0 / 1 checks: every prompt is
# sampled G = 6000 times, three tokens each (no EOS).
G, T = 6000, 3
PLAIN = SamplingConfig(max_new_tokens=T, num_samples=G)
TRUNC = SamplingConfig(max_new_tokens=4, num_samples=3, temperature=0.7, top_k=3)

run_mix = jax.jit(sample_mixture, static_argnums=(0, 6))
run = jax.jit(sample, static_argnums=(0, 5))
logits_fn = jax.jit(lambda p, ids, m: MODEL.apply(p, ids, attention_mask=m))


def _log_softmax64(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _mixture64(pol_logits, ref_logits, beta):
  """log π_mix = log_softmax((1−β) log π + β log π_ref), float64, over the last axis."""
  return _log_softmax64((1 - beta) * _log_softmax64(pol_logits)
                        + beta * _log_softmax64(ref_logits))


def _teacher(out):
  """Float64 per-step log π, log π_ref [N, T, V] at each completion position."""
  ids = jnp.concatenate([out.prompt_ids, out.completion_ids], 1)
  mask = jnp.concatenate([out.prompt_mask, out.completion_mask], 1)
  p, t = out.prompt_ids.shape[1], out.completion_ids.shape[1]
  sl = slice(p - 1, p - 1 + t)
  pol = np.asarray(logits_fn(PARAMS, ids, mask), np.float64)[:, sl]
  ref = np.asarray(logits_fn(REF_PARAMS, ids, mask), np.float64)[:, sl]
  return pol, ref


@functools.lru_cache(maxsize=None)
def _mix(beta, config=PLAIN, seed=0):
  return run_mix(MODEL, PARAMS, REF_PARAMS, jnp.asarray(IDS), jnp.asarray(MASK),
                 jax.random.key(seed), config, beta=jnp.float32(beta))


def _take(logp, tok):
  return np.take_along_axis(logp, np.asarray(tok)[..., None], -1)[..., 0]


@pytest.mark.parametrize("beta", [BETA, 0.85])
def test_logps_equal_float64_mixture(beta):
  out = _mix(beta)
  pol, ref = _teacher(out)
  tok = np.asarray(out.completion_ids)
  assert np.asarray(out.completion_mask).all()  # no EOS: every step is a real token
  np.testing.assert_allclose(np.asarray(out.sampling_logps), _take(_mixture64(pol, ref, beta), tok),
                             atol=1e-5, rtol=1e-5)
  # `logps` stay the policy's own log-probs of the sampled tokens.
  np.testing.assert_allclose(np.asarray(out.logps), _take(_log_softmax64(pol), tok), atol=1e-5,
                             rtol=1e-5)
  # The mixture is not the policy here (the check above could not pass by accident).
  assert np.abs(np.asarray(out.sampling_logps) - np.asarray(out.logps)).max() > 0.05


def test_truncation_applies_to_the_mixture():
  out = _mix(BETA, TRUNC, seed=3)
  pol, ref = _teacher(out)
  mix = _mixture64(pol, ref, BETA)
  tok = np.asarray(out.completion_ids)
  n, t = tok.shape
  q = reference_q(mix.reshape(n * t, VOCAB), 0.7, 3).reshape(n, t, VOCAB)
  qt = _take(q, tok)
  assert (qt > 0).all()
  np.testing.assert_allclose(np.asarray(out.sampling_logps), np.log(qt), atol=2e-5)
  np.testing.assert_allclose(np.asarray(out.logps), _take(_log_softmax64(pol), tok), atol=1e-5)


def test_beta_zero_is_the_plain_sampler_and_beta_one_the_reference():
  ids, mask, key = jnp.asarray(IDS), jnp.asarray(MASK), jax.random.key(7)
  plain = run(MODEL, PARAMS, ids, mask, key, PLAIN)
  zero = _mix(0.0, seed=7)
  np.testing.assert_array_equal(np.asarray(zero.completion_ids), np.asarray(plain.completion_ids))
  np.testing.assert_allclose(np.asarray(zero.logps), np.asarray(plain.logps), atol=1e-6)
  np.testing.assert_allclose(np.asarray(zero.sampling_logps), np.asarray(plain.logps), atol=1e-6)
  ref = run(MODEL, REF_PARAMS, ids, mask, key, PLAIN)
  one = _mix(1.0, seed=7)
  np.testing.assert_array_equal(np.asarray(one.completion_ids), np.asarray(ref.completion_ids))
  np.testing.assert_allclose(np.asarray(one.sampling_logps), np.asarray(ref.logps), atol=1e-6)
  pol, _ = _teacher(one)
  np.testing.assert_allclose(np.asarray(one.logps),
                             _take(_log_softmax64(pol), np.asarray(one.completion_ids)), atol=1e-5)
  # The policy and the reference sample different completions with this key.
  assert (np.asarray(ref.completion_ids) != np.asarray(plain.completion_ids)).any()


def _sequence_probs(prompt, beta):
  """Exact float64 probability of each of the V^T completions (lexicographic order) under
  π_mix and under π."""
  seqs = np.array(list(itertools.product(range(VOCAB), repeat=T)), np.int32)
  ids = np.concatenate([np.repeat(prompt[None], len(seqs), 0), seqs], 1)
  m = jnp.ones(ids.shape, bool)
  p = prompt.shape[0]
  pol = np.asarray(logits_fn(PARAMS, jnp.asarray(ids), m), np.float64)[:, p - 1:-1]
  ref = np.asarray(logits_fn(REF_PARAMS, jnp.asarray(ids), m), np.float64)[:, p - 1:-1]
  mix = _take(_mixture64(pol, ref, beta), seqs).sum(1)
  return np.exp(mix), np.exp(_take(_log_softmax64(pol), seqs).sum(1))


def _chi2(counts, p):
  """Pearson statistic and degrees of freedom, cells with expected count < 5 pooled."""
  n = counts.sum()
  keep = p * n >= 5
  obs = np.append(counts[keep], counts[~keep].sum())
  exp = np.append(p[keep], p[~keep].sum()) * n
  if exp[-1] == 0:
    obs, exp = obs[:-1], exp[:-1]
  return ((obs - exp) ** 2 / exp).sum(), len(obs) - 1


@pytest.mark.parametrize("row", range(len(IDS)))
def test_empirical_sequence_frequencies_match_the_mixture(row):
  """G = 6000 three-token completions per prompt: Pearson chi-square over the 125 sequences
  against the exact float64 mixture passes at the 0.1% level, while the same counts reject
  the policy's own distribution by far (so the check can fail)."""
  out = _mix(BETA)
  prompt = IDS[row][MASK[row]]
  p_mix, p_pol = _sequence_probs(prompt, BETA)
  np.testing.assert_allclose(p_mix.sum(), 1.0, atol=1e-9)
  tok = np.asarray(out.completion_ids)[row * G:(row + 1) * G]
  code = (tok[:, 0] * VOCAB + tok[:, 1]) * VOCAB + tok[:, 2]
  counts = np.bincount(code, minlength=VOCAB ** T)
  stat, df = _chi2(counts, p_mix)
  assert df >= 15  # a real distribution over many cells
  assert stat < stats.chi2.ppf(0.999, df), (stat, df)
  # Total variation: E|freq − p| ≈ sqrt(2p(1−p)/(πG)) per cell under the mixture.
  tv = 0.5 * np.abs(counts / G - p_mix).sum()
  tv_null = 0.5 * np.sqrt(2 * p_mix * (1 - p_mix) / (np.pi * G)).sum()
  assert tv < 1.5 * tv_null, (tv, tv_null)
  assert 0.5 * np.abs(p_pol - p_mix).sum() > 4 * tv_null
  stat_pol, df_pol = _chi2(counts, p_pol)
  assert stat_pol > 5 * stats.chi2.ppf(0.999, df_pol), (stat_pol, df_pol)
  # Each row's summed mixture log-probs are its sequence's exact log-probability.
  np.testing.assert_allclose(np.asarray(out.sampling_logps)[row * G:(row + 1) * G].sum(1),
                             np.log(p_mix[code]), atol=3e-5)


def test_bad_mixture_is_named():
  ids, mask = jnp.asarray(IDS), jnp.asarray(MASK)
  with pytest.raises(ValueError, match="mixture beta must be in"):
    sample_mixture(MODEL, PARAMS, REF_PARAMS, ids, mask, jax.random.key(0), PLAIN, beta=1.5)
  with pytest.raises(ValueError, match=r"pair \(ref_params, beta\)"):
    sample(MODEL, PARAMS, ids, mask, jax.random.key(0), PLAIN, mixture=REF_PARAMS)
