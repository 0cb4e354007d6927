"""Token-loss aggregation modes and the micro-batch-invariant global normaliser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import aggregate as agg
from rlhf_jax.losses import policy_gradient as pg

RNG = np.random.default_rng(4)
B, T = 8, 6
LOSS = RNG.normal(size=(B, T))
LENS = np.array([6, 3, 1, 5, 2, 6, 4, 2])
MASK = (np.arange(T)[None] < LENS[:, None]).astype(np.float64)


def ref(loss, mask, mode, max_len=None):
  masked = loss * mask
  if mode == "token_mean":
    return masked.sum() / mask.sum()
  if mode == "seq_mean_token_mean":
    return np.mean(masked.sum(1) / mask.sum(1))
  if mode == "seq_mean_token_sum":
    return np.mean(masked.sum(1))
  return masked.sum() / (loss.shape[0] * (max_len or loss.shape[1]))


@pytest.mark.parametrize("mode", agg.MODES)
def test_modes_match_reference(mode):
  fn = jax.jit(lambda l, m: agg.aggregate(l, m, mode=mode))
  np.testing.assert_allclose(fn(jnp.asarray(LOSS, jnp.float32), jnp.asarray(MASK)),
                             ref(LOSS, MASK, mode), rtol=1e-5)


def test_dr_grpo_normaliser_uses_max_len_and_groups():
  out = agg.aggregate(jnp.asarray(LOSS), jnp.asarray(MASK), mode="seq_mean_token_sum_norm",
                      max_len=10, num_groups=2)
  np.testing.assert_allclose(out, (LOSS * MASK).sum() / (2 * 4 * 10), rtol=1e-5)
  with pytest.raises(ValueError, match="num_groups"):
    agg.aggregate(jnp.asarray(LOSS), jnp.asarray(MASK), mode="seq_mean_token_sum_norm",
                  num_groups=3)
  with pytest.raises(ValueError, match="mode"):
    agg.aggregate(jnp.asarray(LOSS), jnp.asarray(MASK), mode="mean")


def test_padding_invariance():
  junk = np.where(MASK > 0, 0.0, 1e6)
  for mode in agg.MODES:
    a = agg.aggregate(jnp.asarray(LOSS + junk), jnp.asarray(MASK), mode=mode)
    np.testing.assert_allclose(a, ref(LOSS, MASK, mode), rtol=1e-5)


@pytest.mark.parametrize("mode", agg.MODES)
def test_micro_batch_gradient_invariance(mode):
  """Gradient of a batch of 8 == sum of gradients of 4 micro-batches of 2 (global normaliser)."""
  with jax.enable_x64(True):
    vocab, d = 5, 3
    feats = jnp.asarray(RNG.normal(size=(B, T, d)))
    tokens = jnp.asarray(RNG.integers(0, vocab, size=(B, T)))
    params = jnp.asarray(RNG.normal(size=(d, vocab)))
    old = jnp.asarray(-np.abs(RNG.normal(size=(B, T))))
    adv = jnp.asarray(RNG.normal(size=B))
    mask = jnp.asarray(MASK)

    def loss(w, f, tok, o, a, m, normalizer):
      lp = jnp.take_along_axis(jax.nn.log_softmax(f @ w, axis=-1), tok[..., None], axis=-1)[..., 0]
      per_tok, _ = pg.ppo_clip(lp, o, a, m)
      return agg.aggregate(per_tok, m, mode=mode, normalizer=normalizer)

    grad = jax.jit(jax.value_and_grad(loss))
    parts = lambda i: (feats[i:i + 2], tokens[i:i + 2], old[i:i + 2], adv[i:i + 2],
                       mask[i:i + 2])
    norm = agg.global_normalizer(mask, mode=mode)
    full_loss, full = grad(params, feats, tokens, old, adv, mask, norm)
    micro = [grad(params, *parts(i), norm) for i in range(0, B, 2)]
    np.testing.assert_allclose(sum(g for _, g in micro), full, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sum(v for v, _ in micro), full_loss, rtol=1e-10)
    np.testing.assert_allclose(full_loss, agg.aggregate(
        pg.ppo_clip(jnp.take_along_axis(jax.nn.log_softmax(feats @ params, axis=-1),
                                        tokens[..., None], axis=-1)[..., 0], old, adv, mask)[0],
        mask, mode=mode), rtol=1e-10)
    if mode == "token_mean":  # a per-micro-batch normaliser is not split-invariant
      naive = [grad(params, *parts(i), agg.global_normalizer(parts(i)[-1], mode=mode))
               for i in range(0, B, 2)]
      assert not np.allclose(sum(g for _, g in naive) / 4, full, rtol=1e-3)


@pytest.mark.parametrize("mode", agg.MODES)
def test_check_grads_and_all_ones_mask(mode):
  from jax.test_util import check_grads
  with jax.enable_x64(True):
    check_grads(lambda l: agg.aggregate(l, jnp.asarray(MASK), mode=mode) ** 2,
                (jnp.asarray(LOSS),), order=1, modes=("rev",))
  # without padding every mode but the L_max one is the plain mean of the tokens
  if mode != "seq_mean_token_sum":
    want = LOSS.mean() if mode != "seq_mean_token_sum_norm" else LOSS.sum() / (B * T)
    np.testing.assert_allclose(agg.aggregate(jnp.asarray(LOSS), jnp.ones((B, T)), mode=mode),
                               want, rtol=1e-5)
