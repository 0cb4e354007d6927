"""Attention backends against a float64 numpy reference, and inside the decoder."""

from __future__ import annotations

import dataclasses

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import rlhf_jax.models as M
from rlhf_jax.models import attention as A

B, T, H, KH, D = 2, 11, 4, 2, 8
CPU_BACKENDS = ("xla", "chunked")
LEFT_PAD = np.array([[0] * 4 + [1] * 7, [1] * 11], bool)      # row 0 left-padded
BOTH_PAD = np.array([[0] * 3 + [1] * 5 + [0] * 3, [1] * 9 + [0] * 2], bool)


def _qkv(seed=0, t=T, s=T, dtype=jnp.float32):
  r = np.random.default_rng(seed)
  q = r.normal(size=(B, t, H, D))
  k = r.normal(size=(B, s, KH, D))
  v = r.normal(size=(B, s, KH, D))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _reference(q, k, v, keep):
  """float64: softmax over visible keys; rows with none visible average every value."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  scores = np.where(keep, scores, -1e30)
  scores -= scores.max(-1, keepdims=True)
  p = np.exp(scores)
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", p, v)


def _keep(kv_mask, t, s, offset=0, causal=True):
  keep = np.ones((B, 1, t, s), bool) & np.asarray(kv_mask)[:, None, None, :]
  if causal:
    keep &= (np.arange(s)[None, :] <= np.arange(t)[:, None] + offset)[None, None]
  return keep


def assert_trees_close(a, b, tol=1e-5):
  """Leafwise max |a - b| <= tol * max(1, max |b|): fp32 rounding on gradients of size ~10
  (both backends sit ~2e-6 from a float64 run, normwise)."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert np.abs(x - y).max() <= tol * max(1.0, np.abs(y).max()), np.abs(x - y).max()


def _real_rows(keep):
  """[B, T, 1, 1] true where the query sees at least one key."""
  return keep.any(-1)[:, 0][..., None, None]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("chunk", [4, 5, 11, 64], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("pad", ["left", "both"])
def test_self_attention_matches_float64_reference(backend, chunk, pad):
  q, k, v = _qkv()
  kv_mask = LEFT_PAD if pad == "left" else BOTH_PAD
  fn = lambda q, k, v: A.attention(q, k, v, kv_mask=jnp.asarray(kv_mask), causal=True,  # noqa: E731
                                   backend=backend, chunk_size=chunk)
  keep = _keep(kv_mask, T, T)
  ref = _reference(q, k, v, keep)
  for f in (fn, jax.jit(fn)):
    out = np.asarray(f(q, k, v))
    assert out.shape == (B, T, H, D) and np.isfinite(out).all()
    np.testing.assert_allclose(np.where(_real_rows(keep), out, 0),
                               np.where(_real_rows(keep), ref, 0), atol=1e-5)


@pytest.mark.parametrize("chunk", [3, 8, 64])
def test_chunked_equals_xla_everywhere_including_padding_rows(chunk):
  """Also the rows of padding queries (nothing visible) agree, values and gradients."""
  q, k, v = _qkv(1)
  m = jnp.asarray(BOTH_PAD)

  def loss(backend):
    def f(q, k, v):
      out = A.attention(q, k, v, kv_mask=m, causal=True, backend=backend, chunk_size=chunk)
      return jnp.sum(jnp.sin(out) * jnp.arange(D, dtype=out.dtype)), out
    return f

  (_, ox), gx = jax.value_and_grad(loss("xla"), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  (_, oc), gc = jax.jit(jax.value_and_grad(loss("chunked"), argnums=(0, 1, 2),
                                           has_aux=True))(q, k, v)
  np.testing.assert_allclose(oc, ox, atol=1e-5)
  for a, b in zip(gc, gx):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("offset", [0, 5, 9])
def test_cache_layout_with_offset_matches_reference(backend, offset):
  """Decode reads: t queries at slots offset.. over a [B, Hkv, S, D] cache."""
  s, t = 14, 3
  q, k, v = _qkv(2, t=t, s=s)
  kv_mask = np.ones((B, s), bool)
  kv_mask[0, :2] = False
  keep = _keep(kv_mask, t, s, offset=offset)
  ref = _reference(q, k, v, keep)
  kc, vc = k.swapaxes(1, 2), v.swapaxes(1, 2)
  f = jax.jit(lambda q, kc, vc, off: A.attention(
      q, kc, vc, kv_mask=jnp.asarray(kv_mask), causal=True, q_offset=off, kv_layout="bhsd",
      backend=backend, chunk_size=4))
  out = np.asarray(f(q, kc, vc, jnp.int32(offset)))  # traced offset, as in a decode loop
  np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_segment_ids_and_dense_mask(backend):
  q, k, v = _qkv(3)
  seg = np.array([[1] * 5 + [2] * 6, [1] * 3 + [2] * 3 + [3] * 5], np.int32)
  same = seg[:, :, None] == seg[:, None, :]
  keep = _keep(np.ones((B, T), bool), T, T) & same[:, None]
  ref = _reference(q, k, v, keep)
  out = A.attention(q, k, v, causal=True, q_segment_ids=jnp.asarray(seg),
                    kv_segment_ids=jnp.asarray(seg), backend=backend, chunk_size=4)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  # A per-head dense mask (no causal flag) gives the same as its reference.
  r = np.random.default_rng(4)
  dense = r.random((B, H, T, T)) < 0.6
  dense[..., 0] = True
  out = A.attention(q, k, v, mask=jnp.asarray(dense), backend=backend, chunk_size=4)
  np.testing.assert_allclose(out, _reference(q, k, v, dense), atol=1e-5)


def test_gqa_reads_kv_heads_without_repeating_them():
  """No intermediate of the grouped paths has shape [.., S, H, D] or [.., H, S, D]."""
  s, t = 64, 1
  q, k, v = _qkv(5, t=t, s=s)
  kc, vc = k.swapaxes(1, 2), v.swapaxes(1, 2)
  m = jnp.ones((B, s), bool)
  for backend in CPU_BACKENDS:
    def f(q, kc, vc, backend=backend):
      return A.attention(q, kc, vc, kv_mask=m, causal=True, q_offset=63, kv_layout="bhsd",
                         backend=backend, chunk_size=16).sum()
    jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(q, kc, vc)
    shapes = set()

    def walk(jx):
      for eqn in jx.eqns:
        shapes.update(tuple(getattr(o.aval, "shape", ())) for o in eqn.outvars)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
          walk(sub)
    walk(jaxpr.jaxpr)
    repeated = [sh for sh in shapes if len(sh) == 4 and sh[-1] == D
                and {sh[1], sh[2]} == {H, s}]
    assert not repeated, (backend, repeated)


def test_chunked_backward_memory_below_full_scores():
  """Compiled temporaries of the chunked gradient stay below one [B, H, T, S] f32 array."""
  t = 512
  q, k, v = _qkv(6, t=t, s=t)
  m = jnp.ones((B, t), bool)

  def temp_bytes(backend):
    f = lambda q, k, v: A.attention(q, k, v, kv_mask=m, causal=True, backend=backend,  # noqa: E731
                                    chunk_size=64).sum()
    c = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(q, k, v).compile()
    return c.memory_analysis().temp_size_in_bytes

  scores = B * H * t * t * 4
  assert temp_bytes("xla") > scores
  assert temp_bytes("chunked") < scores / 4


def test_auto_resolution():
  kw = dict(head_dim=64, dtype=jnp.float32)
  assert A.resolve_backend("auto", platform="cpu", q_len=128, kv_len=128, **kw) == "xla"
  assert A.resolve_backend("auto", platform="cpu", q_len=1, kv_len=8192, **kw) == "xla"
  assert A.resolve_backend("auto", platform="cpu", q_len=4096, kv_len=4096, **kw) == "chunked"
  bf = dict(head_dim=64, dtype=jnp.bfloat16)
  assert A.resolve_backend("auto", platform="gpu", q_len=256, kv_len=256, **bf) == "cudnn"
  assert A.resolve_backend("auto", platform="gpu", q_len=256, kv_len=256, **kw) == "xla"
  assert A.resolve_backend("auto", platform="gpu", q_len=1, kv_len=256, kv_layout="bhsd",
                           **bf) == "xla"
  assert A.resolve_backend("auto", platform="tpu", q_len=256, kv_len=256, **bf) == "splash"
  assert A.resolve_backend("auto", platform="tpu", q_len=100, kv_len=100, **bf) == "xla"
  assert A.resolve_backend("auto", platform="tpu", q_len=256, kv_len=256,
                           static_offset=False, **bf) == "xla"
  assert A.resolve_backend("chunked", platform="tpu", q_len=8, kv_len=8, **bf) == "chunked"


def test_errors_name_the_bad_value():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=r"backend 'flash' is unknown.*auto, xla, chunked"):
    A.attention(q, k, v, backend="flash")
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match=r"'splash' runs only on TPU.*'cpu'"):
      A.attention(q, k, v, backend="splash")
    with pytest.raises(ValueError, match=r"'cudnn' runs only on GPU.*'cpu'"):
      A.attention(q, k, v, backend="cudnn")
  with pytest.raises(ValueError, match=r"chunk_size must be a positive int, got 0"):
    A.attention(q, k, v, backend="chunked", chunk_size=0)
  with pytest.raises(ValueError, match=r"kv_mask \(2, 5\) must be \[B, S\]"):
    A.attention(q, k, v, kv_mask=jnp.ones((2, 5), bool))
  with pytest.raises(ValueError, match=r"cudnn.*bfloat16 or float16"):
    A._cudnn(q, k, v, A._Spec(None, True, None, None, None, None), "bshd", 0.3)
  with pytest.raises(ValueError, match=r"splash.*multiples of 128"):
    A._splash(q, k, v, A._Spec(None, True, None, None, None, None), "bshd", 0.3)
  with pytest.raises(ValueError, match=r"DecoderConfig.attention='flash' is unknown"):
    M.from_config(LLAMA, attention="flash")
  with pytest.raises(ValueError, match=r"attention_chunk must be a positive int, got -2"):
    M.from_config(LLAMA, attention_chunk=-2)


def test_splash_wrapper_in_interpret_mode(monkeypatch):
  """The splash kernel (Pallas interpret mode on CPU) agrees with the reference."""
  pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
  monkeypatch.setattr(A, "_SPLASH_INTERPRET", True)
  t = 128
  q, k, v = _qkv(7, t=t, s=t)
  kv_mask = np.ones((B, t), bool)
  kv_mask[0, :37] = False
  keep = _keep(kv_mask, t, t)
  try:
    out = A.attention(q, k, v, kv_mask=jnp.asarray(kv_mask), causal=True, backend="splash")
  except Exception as e:  # pylint: disable=broad-except
    if isinstance(e, ValueError):
      raise
    pytest.skip(f"Pallas TPU interpret mode unavailable here: {type(e).__name__}")
  rows = _real_rows(keep)
  np.testing.assert_allclose(np.where(rows, out, 0), np.where(rows, _reference(q, k, v, keep), 0),
                             atol=1e-5)


# ----------------------------------------------------------------------------- decoder

V = 64
LLAMA = dict(model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=48,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             initializer_range=0.3)
IDS = jnp.array([[0, 0, 0, 7, 8, 9, 10, 11, 12, 13, 14],
                 [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0]], jnp.int32)
MASK = jnp.array([[0, 0, 0] + [1] * 8, [1] * 10 + [0]], jnp.int32)


@pytest.fixture(scope="module")
def llama():
  model = M.from_config(LLAMA)
  return model, model.init(jax.random.key(0))


@pytest.mark.parametrize("chunk", [4, 16])
def test_decoder_chunked_equals_xla_logits_and_grads(llama, chunk):
  model, params = llama
  xla = model.with_options(attention="xla")
  chunked = model.with_options(attention="chunked", attention_chunk=chunk)
  real = np.asarray(MASK, bool)
  lx, lc = xla.apply(params, IDS, MASK), chunked.apply(params, IDS, MASK)
  np.testing.assert_allclose(np.asarray(lc)[real], np.asarray(lx)[real], atol=1e-5)

  def loss(m):
    return lambda p: jnp.sum(M.token_logps(m, p, IDS, MASK)[0] * MASK)
  gx, gc = jax.grad(loss(xla))(params), jax.grad(loss(chunked))(params)
  assert_trees_close(gc, gx)


@pytest.mark.parametrize("per_layer", [False, True], ids=["stacked", "per_layer"])
def test_decoder_chunked_decode_matches_full_forward(llama, per_layer):
  model, params = llama
  model = model.with_options(attention="chunked", attention_chunk=4)
  full = np.asarray(model.apply(params, IDS, MASK))
  prompt, total = 6, IDS.shape[1]
  pos = jnp.maximum(jnp.cumsum(MASK, 1) - 1, 0)
  cache = model.init_cache(B, total + 1)
  if per_layer:
    params, cache = M.unstack_layers(params), M.unstack_cache(cache)
  kv = jnp.zeros((B, total + 1), bool).at[:, :prompt].set(MASK[:, :prompt] > 0)
  step = jax.jit(lambda c, ids, p, w, kvm: model.decode(params, ids, p, c, write_index=w,
                                                         kv_mask=kvm))
  logits, cache = step(cache, IDS[:, :prompt], pos[:, :prompt], 0, kv)
  real = np.asarray(MASK[:, :prompt]) > 0
  np.testing.assert_allclose(np.asarray(logits)[real], full[:, :prompt][real], atol=1e-5)
  for t in range(prompt, total - 1):
    kv = kv.at[:, t].set(True)
    logits, cache = step(cache, IDS[:, t:t + 1], pos[:, t:t + 1], jnp.int32(t), kv)
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5)


def test_completion_logps_with_chunked_attention(llama):
  """Prompt K/V served from a cache (gradient through it) under the chunked backend."""
  model, params = llama
  chunked = model.with_options(attention="chunked", attention_chunk=3)
  p_ids, p_mask = IDS[:, :5], jnp.asarray([[0, 0, 0, 1, 1], [1] * 5], jnp.int32)
  c_ids = jnp.repeat(IDS[:, 5:], 2, axis=0)
  c_mask = jnp.ones_like(c_ids)

  def loss(m):
    return lambda p: jnp.sum(M.completion_logps(m, p, p_ids, p_mask, c_ids, c_mask,
                                                group_size=2)[0])
  vx, gx = jax.value_and_grad(loss(model.with_options(attention="xla")))(params)
  vc, gc = jax.value_and_grad(loss(chunked))(params)
  np.testing.assert_allclose(vc, vx, rtol=1e-6)
  assert_trees_close(gc, gx)


def test_dense_mask_path_still_served(llama):
  """`Decoder._run` keeps taking an explicit [B, 1, T, S] mask (packed sequences)."""
  model, params = llama
  t = IDS.shape[1]
  m = np.asarray(MASK, bool)
  dense = (np.tril(np.ones((t, t), bool))[None] & m[:, None, :])[:, None]
  pos = jnp.maximum(jnp.cumsum(MASK, 1) - 1, 0)
  for backend in CPU_BACKENDS:
    mm = dataclasses.replace(model, config=dataclasses.replace(model.config,
                                                               attention=backend))
    h, _ = mm.module.apply({"params": params}, IDS, pos, jnp.asarray(dense), None, 0,
                           method=type(mm.module)._run)
    ref = model.hidden(params, IDS, MASK)
    np.testing.assert_allclose(np.asarray(h)[m], np.asarray(ref)[m], atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bfloat16_inputs(backend):
  """bf16 q/k/v: float32 scores and softmax, output bf16 within bf16 rounding."""
  q, k, v = _qkv(8, dtype=jnp.bfloat16)
  out = A.attention(q, k, v, kv_mask=jnp.asarray(LEFT_PAD), causal=True, backend=backend,
                    chunk_size=4)
  assert out.dtype == jnp.bfloat16
  keep = _keep(LEFT_PAD, T, T)
  ref = _reference(np.asarray(q, np.float32), np.asarray(k, np.float32),
                   np.asarray(v, np.float32), keep)
  rows = _real_rows(keep)
  err = np.abs(np.where(rows, np.asarray(out, np.float32) - ref, 0)).max()
  assert err < 3e-2, err
