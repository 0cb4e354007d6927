"""Token-selection methods against an independent float64 numpy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.sampling import Greedy, SamplingConfig, Truncated, make_method


def reference_q(logits, temperature, top_k=None, top_p=None):
  """Exact sampled distribution, float64, written from the definition (rows of [B, V])."""
  out = []
  for row in np.asarray(logits, np.float64):
    z = row / temperature
    order = sorted(range(len(z)), key=lambda i: (-z[i], i))
    support = order[:top_k] if top_k else order
    p = np.exp(z[support] - z[support].max())
    p /= p.sum()
    if top_p is not None:
      kept, mass = [], 0.0
      for tok, pr in zip(support, p):
        if kept and mass >= top_p:
          break
        kept.append(tok)
        mass += pr
      support = kept
    q = np.zeros_like(z)
    e = np.exp(z[support] - z[support].max())
    q[support] = e / e.sum()
    out.append(q)
  return np.stack(out)


LOGITS = np.array([[2.0, 1.0, 0.5, -0.3, 1.7, -2.0],
                   [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]], np.float32)
CASES = [dict(temperature=1.0), dict(temperature=0.7), dict(temperature=1.3, top_k=3),
         dict(temperature=1.0, top_p=0.8), dict(temperature=0.8, top_k=4, top_p=0.7),
         dict(temperature=1.0, top_k=1), dict(temperature=2.0, top_p=0.3)]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_log_probs_match_reference(case):
  got = np.exp(np.asarray(jax.jit(Truncated(**case).log_probs)(LOGITS), np.float64))
  np.testing.assert_allclose(got, reference_q(LOGITS, **case), atol=1e-6)


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[3], CASES[4]], ids=str)
def test_empirical_distribution_matches_exact(case):
  """20000 draws per row; every token frequency within 5 standard errors of q (fixed seed)."""
  n = 20000
  method = Truncated(**case)
  logits = jnp.repeat(jnp.asarray(LOGITS), n, axis=0)
  keys = jax.random.split(jax.random.key(0), logits.shape[0])
  tokens, slogp = jax.jit(method.get_next_tokens)(logits, keys)
  q = reference_q(LOGITS, **case)
  tokens = np.asarray(tokens).reshape(2, n)
  for r in range(2):
    freq = np.bincount(tokens[r], minlength=6) / n
    se = np.sqrt(q[r] * (1 - q[r]) / n)
    assert np.all(np.abs(freq - q[r]) <= 5 * se + 1e-12), (r, freq, q[r])
    assert np.all(freq[q[r] == 0] == 0)
  # sampling_logps is the log of the exact distribution at the drawn token.
  expect = np.log(q[np.repeat(np.arange(2), n), tokens.reshape(-1)])
  np.testing.assert_allclose(np.asarray(slogp), expect, atol=1e-5)


def test_per_row_keys_are_independent_of_batch():
  method = Truncated(temperature=1.0)
  keys = jax.random.split(jax.random.key(3), 4)
  logits = jnp.asarray(np.random.RandomState(0).randn(4, 6), jnp.float32)
  full, _ = method.get_next_tokens(logits, keys)
  for i in range(4):
    one, _ = method.get_next_tokens(logits[i:i + 1], keys[i:i + 1])
    assert int(one[0]) == int(full[i])


def test_greedy_and_top_k_1_special_cases():
  tok, slogp = Greedy().get_next_tokens(jnp.asarray(LOGITS))
  np.testing.assert_array_equal(np.asarray(tok), LOGITS.argmax(-1))
  np.testing.assert_array_equal(np.asarray(slogp), 0.0)
  # top_k = 1 is greedy with log q = 0.
  tok1, slogp1 = Truncated(top_k=1).get_next_tokens(jnp.asarray(LOGITS), jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(tok1), LOGITS.argmax(-1))
  np.testing.assert_allclose(np.asarray(slogp1), 0.0, atol=1e-7)
  assert isinstance(make_method(temperature=0.0), Greedy)
  assert isinstance(make_method(temperature=0.5, top_k=2), Truncated)


@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=1.0, top_k=0), "top_k"),
    (dict(temperature=1.0, top_p=1.5), "top_p"), (dict(temperature=1.0, top_p=0.0), "top_p")])
def test_bad_method_arguments(kwargs, field):
  with pytest.raises(ValueError, match=field):
    make_method(**kwargs) if kwargs["temperature"] >= 0 else Truncated(**kwargs)


@pytest.mark.parametrize("kwargs,field", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=4, num_samples=0), "num_samples"),
    (dict(max_new_tokens=4, temperature=-0.1), "temperature"),
    (dict(max_new_tokens=4, eos_ids=(-1,)), "eos_ids"), (dict(max_new_tokens=4, top_k=-2), "top_k")])
def test_bad_config(kwargs, field):
  with pytest.raises(ValueError, match=field):
    SamplingConfig(**kwargs)


def test_config_is_hashable_and_normalises_eos():
  a = SamplingConfig(max_new_tokens=4, eos_ids=[2, 3])
  b = SamplingConfig(max_new_tokens=4, eos_ids=(2, 3))
  assert a == b and hash(a) == hash(b) and a.eos_ids == (2, 3)
  assert SamplingConfig(max_new_tokens=4, eos_ids=5).eos_ids == (5,)


def reference_inverse_cdf(q, u):
  """Float64 inverse CDF over tokens sorted by (-q, id): first token whose cumulative q > u."""
  out = []
  for row, ur in zip(q, u):
    order = sorted(range(len(row)), key=lambda i: (-row[i], i))
    cdf = np.cumsum(row[order])
    out.append(order[int(np.searchsorted(cdf, ur * cdf[-1], side="right"))])
  return np.array(out)


@pytest.mark.parametrize("case", [c for c in CASES if c.get("top_k") or c.get("top_p")], ids=str)
def test_select_is_the_inverse_cdf_of_q(case):
  """`select` picks the token where the float64 cumulative q first exceeds u."""
  method = Truncated(**case)
  q = reference_q(LOGITS, **case)
  # Uniforms away from the cumulative boundaries, where float32 rounding could flip a draw.
  for u0 in np.linspace(0.013, 0.987, 17):
    u = np.full((2,), u0)
    tokens, slogp = jax.jit(method.select)(jnp.asarray(LOGITS), jnp.asarray(u, jnp.float32))
    want = reference_inverse_cdf(q, u)
    np.testing.assert_array_equal(np.asarray(tokens), want)
    np.testing.assert_allclose(np.asarray(slogp), np.log(q[[0, 1], want]), atol=1e-5)


def test_select_never_picks_a_truncated_token_near_u_one():
  """A target equal to the total mass (float32 rounding of u * total near u = 1; forced here
  with u = 1) still picks a token of S, not a truncated one after it."""
  method = Truncated(temperature=1.0, top_p=0.3)
  q = reference_q(LOGITS, temperature=1.0, top_p=0.3)
  u = jnp.ones((2,), jnp.float32)
  tokens, slogp = method.select(jnp.asarray(LOGITS), u)
  assert all(q[r, int(t)] > 0 for r, t in enumerate(np.asarray(tokens)))
  assert np.all(np.isfinite(np.asarray(slogp)))


def test_select_checks_uniform_shape():
  with pytest.raises(ValueError, match="uniforms"):
    Truncated().select(jnp.asarray(LOGITS), jnp.zeros((3,)))


def test_plain_flag():
  assert Truncated().is_plain
  assert not Truncated(temperature=0.9).is_plain
  assert not Truncated(top_k=5).is_plain
  assert Truncated(top_p=1.0).is_plain


@pytest.mark.parametrize("v", [1, 2, 7, 96, 1024, 4097])
def test_cumsum_last_matches_float64_cumsum(v):
  """Blocked triangular-matmul cumsum (V <= 4096) and the plain one (longer) vs numpy."""
  from rlhf_jax.sampling.methods import cumsum_last
  x = jax.random.uniform(jax.random.key(v), (3, v))
  want = np.cumsum(np.asarray(x, np.float64), axis=-1)
  np.testing.assert_allclose(np.asarray(jax.jit(cumsum_last)(x)), want, rtol=2e-6, atol=1e-6)
