"""Rematerialisation policies, compute / parameter / KV-cache dtypes."""

from __future__ import annotations

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import rlhf_jax.models as M

V = 64
LLAMA = dict(model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=48,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             initializer_range=0.3)
IDS = jnp.array([[0, 0, 0, 7, 8, 9, 10, 11, 12, 13],
                 [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], jnp.int32)
MASK = jnp.array([[0, 0, 0] + [1] * 7, [1] * 10], jnp.int32)


@pytest.fixture(scope="module")
def llama():
  model = M.from_config(LLAMA)
  return model, model.init(jax.random.key(0))


def _loss(model):
  return lambda p: jnp.sum(M.token_logps(model, p, IDS, MASK)[0] * MASK)


def _checkpoints(fn, *args):
  """The `policy` of every checkpoint (remat) equation in fn's jaxpr, nested ones too."""
  found = []

  def walk(jx):
    for eqn in jx.eqns:
      if eqn.primitive.name in ("checkpoint", "remat", "remat2"):
        found.append(eqn.params.get("policy"))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def test_defaults_are_unchanged(llama):
  model, params = llama
  assert model.dtype == jnp.float32 and model.param_dtype == jnp.float32
  assert model.cache_dtype == jnp.float32 and model.remat == "none"
  assert model.config.attention == "auto" and model.config.attention_chunk == 512
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  assert model.init_cache(2, 4).k.dtype == jnp.float32
  assert not _checkpoints(jax.grad(_loss(model)), params)


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"])
@pytest.mark.parametrize("per_layer", [False, True], ids=["stacked", "per_layer"])
def test_remat_gradients_equal_no_remat(llama, policy, per_layer):
  model, params = llama
  if per_layer:
    params = M.unstack_layers(params)
  remat = model.with_options(remat=policy)
  assert remat.remat == policy
  found = _checkpoints(jax.grad(_loss(remat)), params)
  if not (per_layer and policy == "full"):  # that one is `decoder.checkpoint_late`
    assert found, "no checkpointed layer in the gradient"
    want = None if policy == "full" else getattr(jax.checkpoint_policies, policy)
    assert all(p is want for p in found)
  v0, g0 = jax.jit(jax.value_and_grad(_loss(model)))(params)
  v1, g1 = jax.jit(jax.value_and_grad(_loss(remat)))(params)
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * max(1.0, np.abs(b).max())


def test_full_remat_frees_the_layers_activations_with_per_layer_weights():
  """Compiled temporary memory of the log-prob gradient at 6 layers: with remat="full" the
  backward keeps one layer's activations at a time, also with per-layer weights (where
  XLA's CPU backend would otherwise merge the recomputation into the forward pass)."""
  hf = dict(LLAMA, num_hidden_layers=6, hidden_size=64, intermediate_size=256,
            max_position_embeddings=256)
  ids = jax.ShapeDtypeStruct((8, 128), jnp.int32)

  def temp(remat):
    model = M.from_config(hf, remat=remat)
    params = jax.eval_shape(M.unstack_layers, jax.eval_shape(model.init, jax.random.key(0)))
    f = jax.grad(lambda p, i: jnp.sum(M.token_logps(model, p, i)[0]))
    return jax.jit(f).lower(params, ids).compile().memory_analysis().temp_size_in_bytes
  none, full = temp("none"), temp("full")
  assert full < 0.5 * none, (full, none)


def test_remat_accepts_bools_and_names_bad_policies():
  assert M.from_config(LLAMA, remat=True).remat == "full"
  assert M.from_config(LLAMA, remat=False).remat == "none"
  with pytest.raises(ValueError, match=r"remat='everything' is unknown; use one of none, "
                                       r"full, dots_saveable, dots_with_no_batch_dims_saveable"):
    M.from_config(LLAMA, remat="everything")
  with pytest.raises(ValueError, match=r"remat='dots' is unknown"):
    M.from_config(LLAMA).with_options(remat="dots")


def test_bf16_compute_with_float32_master_weights(llama):
  model, params = llama
  mixed = model.with_options(dtype="bfloat16", param_dtype="float32")
  p = mixed.init(jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))
  out = mixed.apply(params, IDS, MASK)
  assert out.dtype == jnp.bfloat16
  ref = np.asarray(model.apply(params, IDS, MASK))
  real = np.asarray(MASK, bool)
  got = np.asarray(out, np.float32)
  rel = np.linalg.norm(got[real] - ref[real]) / np.linalg.norm(ref[real])
  assert rel < 0.04, rel  # bf16 activations through two layers
  grads = jax.grad(_loss(mixed))(params)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  g32 = jax.grad(_loss(model))(params)
  cos = lambda a, b: float(np.vdot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])  # noqa: E731
  assert cos(flat(grads), flat(g32)) > 0.99


@pytest.mark.parametrize("per_layer", [False, True], ids=["stacked", "per_layer"])
def test_cache_dtype(llama, per_layer):
  model, params = llama
  m16 = model.with_options(cache_dtype="bfloat16")
  assert m16.dtype == jnp.float32 and m16.cache_dtype == jnp.bfloat16
  cache = m16.init_cache(2, 12)
  assert cache.k.dtype == jnp.bfloat16 and cache.v.dtype == jnp.bfloat16
  if per_layer:
    params, cache = M.unstack_layers(params), M.unstack_cache(cache)
  full = np.asarray(model.apply(params, IDS, MASK))
  pos = jnp.maximum(jnp.cumsum(MASK, 1) - 1, 0)
  kv = jnp.zeros((2, 12), bool).at[:, :10].set(MASK > 0)
  logits, cache = jax.jit(lambda c: m16.decode(params, IDS, pos, c, write_index=0,
                                               kv_mask=kv))(cache)
  leaves = jax.tree.leaves(cache)
  assert all(x.dtype == jnp.bfloat16 for x in leaves)
  assert logits.dtype == jnp.float32
  real = np.asarray(MASK, bool)
  err = np.abs(np.asarray(logits)[real] - full[real]).max()
  assert 0 < err < 0.05 * np.abs(full).max(), err  # K/V rounded to bf16, compute in f32


def test_bad_dtypes_are_named():
  with pytest.raises(ValueError, match=r"cache_dtype='int8' is not a supported dtype"):
    M.from_config(LLAMA, cache_dtype="int8")
  with pytest.raises(ValueError, match=r"dtype='float8' is not a supported dtype"):
    M.from_config(LLAMA).with_options(dtype="float8")


def test_with_options_keeps_what_it_is_not_given(llama):
  model, _ = llama
  m = model.with_options(attention="chunked", attention_chunk=64, remat="dots_saveable",
                         dtype=jnp.bfloat16)
  assert (m.config.attention, m.config.attention_chunk, m.remat, m.dtype_name) == (
      "chunked", 64, "dots_saveable", "bfloat16")
  assert m.param_dtype_name == "float32" and m.head == "lm"
  assert m.config.hidden_size == model.config.hidden_size
  assert hash(m) != hash(model) and m.with_options() == m


def test_remat_with_chunked_attention(llama):
  """The chunked backend's custom VJP under a checkpoint policy, per-layer params."""
  model, params = llama
  params = M.unstack_layers(params)
  chunked = model.with_options(attention="chunked", attention_chunk=4, remat="dots_saveable")
  g0 = jax.grad(_loss(model.with_options(attention="xla")))(params)
  g1 = jax.jit(jax.grad(_loss(chunked)))(params)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * max(1.0, np.abs(b).max())
