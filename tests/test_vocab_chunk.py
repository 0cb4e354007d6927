"""Log-probs streamed over vocabulary chunks equal the full log-softmax (values, entropies,
gradients), with `vocab_limit`, tied / separate heads and chunks that do not divide V."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rlhf_jax.models as M
from rlhf_jax.data import CharTokenizer
from rlhf_jax.models.vocab_chunked import lm_kernel, stream_logps
from rlhf_jax.train import build

V, D = 37, 8


def _np_reference(h, w, targets, limit):
  """float64 log p(target), entropy of softmax(h @ w) over ids < limit."""
  logits = np.einsum("bcd,dv->bcv", np.float64(h), np.float64(w))[..., :limit]
  m = logits.max(-1, keepdims=True)
  logz = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  p = np.exp(logits - logz[..., None])
  picked = np.take_along_axis(logits, np.minimum(targets, limit - 1)[..., None], -1)[..., 0]
  lp = np.where(targets < limit, picked - logz, -np.inf)
  return lp, logz - (p * logits).sum(-1)


def _full(h, w, targets, limit):
  """The unchunked float32 path (autodiff reference)."""
  logits = h @ w
  logits = jnp.where(jnp.arange(w.shape[1]) < limit, logits, -jnp.inf)
  logz = jax.nn.logsumexp(logits, -1)
  picked = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  p = jnp.exp(logits - logz[..., None])
  return picked - logz, logz - jnp.sum(p * jnp.where(jnp.isfinite(logits), logits, 0.0), -1)


@pytest.fixture(scope="module")
def arrays():
  rng = np.random.default_rng(0)
  h = rng.normal(size=(2, 5, D)).astype(np.float32)
  w = (2 * rng.normal(size=(D, V))).astype(np.float32)
  t = rng.integers(0, V, (2, 5)).astype(np.int32)
  t[0, 0] = V - 1  # beyond vocab_limit=30 below
  return h, w, t


@pytest.mark.parametrize("tied,chunk,limit", [(False, 8, V), (True, 5, 30), (False, 37, 30),
                                               (True, 64, V)])
def test_streamed_equals_float64_reference_and_full_gradients(arrays, tied, chunk, limit):
  h, w, t = arrays
  kernel = w.T if tied else w
  f = jax.jit(lambda h, k: stream_logps(h, k, t, tied=tied, vocab_chunk=chunk,
                                        vocab_limit=None if limit == V else limit))
  lp, ent = f(h, kernel)
  want_lp, want_ent = _np_reference(h, w, t, limit)
  np.testing.assert_array_equal(np.isfinite(lp), np.isfinite(want_lp))
  fin = np.isfinite(want_lp)
  np.testing.assert_allclose(np.asarray(lp)[fin], want_lp[fin], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, want_ent, rtol=1e-5, atol=1e-5)

  gl = np.linspace(-1, 1, t.size).reshape(t.shape).astype(np.float32)
  ge = np.linspace(2, -0.5, t.size).reshape(t.shape).astype(np.float32)

  def loss(fn):
    def go(h, k):
      lp, ent = fn(h, k)
      return jnp.sum(jnp.where(jnp.isfinite(lp), lp, 0.0) * gl) + jnp.sum(ent * ge)
    return go
  got = jax.grad(loss(f), (0, 1))(h, kernel)
  full = lambda h, k: _full(h, k.T if tied else k, t, limit)  # noqa: E731
  want = jax.grad(loss(full), (0, 1))(h, kernel)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(got[1]).max()) > 0


LLAMA = dict(model_type="llama", vocab_size=V, hidden_size=D, intermediate_size=24,
             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
             max_position_embeddings=32, initializer_range=0.5)


@pytest.mark.parametrize("tied", [False, True])
def test_token_and_completion_logps_with_vocab_chunk_equal_the_default(tied):
  model = M.from_config(dict(LLAMA, tie_word_embeddings=tied))
  params = model.init(jax.random.key(0))
  chunked = model.with_options(vocab_chunk=6)  # 37 = 6 * 6 + 1: the last chunk overlaps
  assert chunked.vocab_chunk == 6 and model.vocab_chunk is None
  ids = jax.random.randint(jax.random.key(1), (4, 9), 0, 30)
  mask = jnp.ones_like(ids).at[0, :2].set(0)

  def loss(m, p):
    lp, ent = M.token_logps(m, p, ids, mask, chunk_size=4, vocab_limit=30)
    return jnp.sum(lp * mask) + 0.5 * jnp.sum(ent * mask), (lp, ent)
  grad = lambda m: jax.jit(jax.value_and_grad(lambda p: loss(m, p), has_aux=True))  # noqa: E731
  (_, (lp0, ent0)), g0 = grad(model)(params)
  (_, (lp1, ent1)), g1 = grad(chunked)(params)
  np.testing.assert_allclose(lp1, lp0, atol=1e-5)
  np.testing.assert_allclose(ent1, ent0, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)

  if tied:
    return
  pids, pmask, cids = ids[:2, :4], mask[:2, :4], ids[:, 4:]
  cmask = jnp.ones_like(cids)
  comp = lambda m, **kw: jax.jit(lambda p: M.completion_logps(  # noqa: E731
      m, p, pids, pmask, cids, cmask, group_size=2, **kw))(params)
  want, got, arg = comp(model), comp(chunked), comp(model, vocab_chunk=6)
  for a, b, c in zip(got, want, arg):
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(c, b, atol=1e-5)


def test_vocab_chunk_memory_does_not_grow_with_batch_times_vocab():
  """Compiled temporary memory of the log-prob + gradient: growing V by dv costs the
  unchunked path a [B, T, dv] float32 block, the chunked one only kernel-sized buffers."""
  b, t = 2, 256

  def temp(v, chunk):
    model = M.from_config(dict(LLAMA, vocab_size=v, tie_word_embeddings=True))
    h = jax.ShapeDtypeStruct((b, t, D), jnp.float32)
    p = {"embed": jax.ShapeDtypeStruct((v, D), jnp.float32)}
    y = jax.ShapeDtypeStruct((b, t), jnp.int32)
    f = jax.grad(lambda p, h, y: jnp.sum(M.logps_from_hidden(  # noqa: E731
        model, p, h, y, chunk_size=t, vocab_chunk=chunk)[0]), (0, 1))
    return jax.jit(f).lower(p, h, y).compile().memory_analysis().temp_size_in_bytes
  dv = 8192
  block = b * t * dv * 4
  grow_full = temp(2 * dv, None) - temp(dv, None)
  grow_chunked = temp(2 * dv, 256) - temp(dv, 256)
  assert grow_full >= block > 8 * grow_chunked, (grow_full, grow_chunked, block)


def test_vocab_chunk_memory_with_position_chunks_holds_one_kernel_gradient():
  """Several position chunks (`chunk_size` < T): the backward keeps one kernel-sized
  gradient accumulator and no per-chunk copy of the kernel, so the temporary memory is no
  larger than with one position chunk (whose [b, T, vocab_chunk] blocks are bigger)."""
  b, t, v = 2, 256, 16384
  model = M.from_config(dict(LLAMA, vocab_size=v, tie_word_embeddings=True))
  h = jax.ShapeDtypeStruct((b, t, D), jnp.float32)
  p = {"embed": jax.ShapeDtypeStruct((v, D), jnp.float32)}
  y = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def temp(chunk_size):
    f = jax.grad(lambda p, h, y: jnp.sum(M.logps_from_hidden(  # noqa: E731
        model, p, h, y, chunk_size=chunk_size, vocab_chunk=256)[0]), (0, 1))
    return jax.jit(f).lower(p, h, y).compile().memory_analysis().temp_size_in_bytes
  one, four = temp(t), temp(t // 4)
  assert four <= one, (four, one, v * D * 4)


def test_config_model_vocab_chunk():
  hf = dict(LLAMA, vocab_size=None)
  hf.pop("vocab_size")
  model, _ = build.build_model({"hf_config": hf, "vocab_chunk": 16}, CharTokenizer())
  assert model.vocab_chunk == 16
  with pytest.raises(ValueError, match=r"config\.model .*vocab_chunk=0.*positive int"):
    build.build_model({"hf_config": hf, "vocab_chunk": 0}, CharTokenizer())
  with pytest.raises(ValueError, match="vocab_chunk needs an LM-head"):
    lm_kernel(model.with_head("value"), {})
