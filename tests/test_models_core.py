"""KV-cache decoding, chunked token log-probs, logical axes and error messages."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rlhf_jax.models as M

V = 96
LLAMA = dict(model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=64,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             initializer_range=0.3)
GPT2 = dict(model_type="gpt2", vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32,
            initializer_range=0.3)
IDS = jnp.array([[0, 0, 0, 7, 8, 9, 10, 11, 12, 13],
                 [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], jnp.int32)
MASK = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 10], jnp.int32)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request):
  model = M.from_config(LLAMA if request.param == "llama" else GPT2)
  return model, model.init(jax.random.key(0))


@pytest.mark.parametrize("per_layer", [False, True], ids=["stacked", "per_layer"])
def test_decode_prefill_and_steps_match_apply(lm, per_layer):
  model, params = lm
  full = np.asarray(model.apply(params, IDS, attention_mask=MASK))
  prompt, total = 5, IDS.shape[1]
  pos = jnp.maximum(jnp.cumsum(MASK, 1) - 1, 0)
  cache = model.init_cache(2, total + 2)
  assert isinstance(cache, M.KVCache) and cache.k.shape == (2, 2, model.config.num_kv_heads, total + 2, 8)
  if per_layer:  # the layout the sampler decodes with
    params, cache = M.unstack_layers(params), M.unstack_cache(cache)
  kv = jnp.zeros((2, total + 2), bool).at[:, :prompt].set(MASK[:, :prompt] > 0)
  step = jax.jit(lambda c, ids, p, w, kvm: model.decode(params, ids, p, c, write_index=w,
                                                         kv_mask=kvm))
  logits, cache = step(cache, IDS[:, :prompt], pos[:, :prompt], 0, kv)
  real = np.asarray(MASK[:, :prompt]) > 0
  assert np.abs(np.asarray(logits) - full[:, :prompt])[real].max() < 1e-5
  for t in range(prompt, total):
    kv = kv.at[:, t].set(True)
    logits, cache = step(cache, IDS[:, t:t + 1], pos[:, t:t + 1], jnp.int32(t), kv)
    assert logits.shape == (2, 1, V)
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5)


def test_token_logps_equals_log_softmax_gather(lm):
  model, params = lm
  logits = np.asarray(model.apply(params, IDS, attention_mask=MASK), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  ref = np.take_along_axis(logp[:, :-1], np.asarray(IDS)[:, 1:, None], -1)[..., 0]
  ref_ent = -(np.exp(logp) * logp).sum(-1)[:, :-1]
  for chunk in (3, 4, 64):  # ragged last chunk, exact, single chunk
    lp, ent = M.token_logps(model, params, IDS, MASK, chunk_size=chunk)
    assert lp.shape == IDS.shape and ent.shape == IDS.shape
    np.testing.assert_allclose(lp[:, 1:], ref, atol=1e-5)
    np.testing.assert_allclose(ent[:, 1:], ref_ent, atol=1e-5)
    assert np.all(np.asarray(lp[:, 0]) == 0)


def test_per_layer_params_give_the_same_outputs_and_gradients(lm):
  """`unstack_layers` is a layout change only: same logits, and the gradient taken through
  it equals the gradient w.r.t. the stacked parameters."""
  model, params = lm
  per_layer = M.unstack_layers(params)
  assert isinstance(per_layer["layers"], tuple) and len(per_layer["layers"]) == 2
  assert M.unstack_layers(per_layer) is per_layer
  np.testing.assert_allclose(model.apply(per_layer, IDS, attention_mask=MASK),
                             model.apply(params, IDS, attention_mask=MASK), atol=1e-5)
  loss = lambda p: jnp.sum(M.token_logps(model, p, IDS, MASK)[0])
  g_stacked = jax.grad(loss)(params)
  g_through = jax.grad(lambda p: loss(M.unstack_layers(p)))(params)
  for a, b in zip(jax.tree.leaves(g_stacked), jax.tree.leaves(g_through)):
    # float32 sums in another order (GPU fusions): absolute error scales with the leaf
    np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(np.abs(b).max())), rtol=1e-5)


@pytest.mark.parametrize("per_layer", [False, True], ids=["stacked", "per_layer"])
def test_completion_logps_with_shared_prompts_equal_full_rows(lm, per_layer):
  """Prompts run once per group of G and reused as a KV cache give the same completion
  log-probs, entropies and gradients as running every [prompt, completion] row in full."""
  model, params = lm
  if per_layer:
    params = M.unstack_layers(params)
  g, p = 3, 5
  prompt = IDS[:, :p]  # row 0 left-padded
  pmask = MASK[:, :p]
  comp = jax.random.randint(jax.random.key(1), (2 * g, 4), 1, V)
  cmask = jnp.ones(comp.shape, bool).at[1, 2:].set(False).at[4, 1:].set(False)
  full_ids = jnp.concatenate([jnp.repeat(prompt, g, 0), comp], 1)
  full_mask = jnp.concatenate([jnp.repeat(pmask, g, 0).astype(bool), cmask], 1)
  lp, ent = M.completion_logps(model, params, prompt, pmask, comp, cmask, group_size=g)
  ref_lp, ref_ent = M.token_logps(model, params, full_ids, full_mask)
  m = np.asarray(cmask)
  np.testing.assert_allclose(np.asarray(lp)[m], np.asarray(ref_lp[:, p:])[m], atol=1e-5)
  np.testing.assert_allclose(np.asarray(ent)[m], np.asarray(ref_ent[:, p:])[m], atol=1e-5)
  shared = lambda q: jnp.sum(jnp.where(cmask, M.completion_logps(
      model, q, prompt, pmask, comp, cmask, group_size=g)[0], 0.0))
  full = lambda q: jnp.sum(jnp.where(cmask, M.token_logps(model, q, full_ids, full_mask)[0][:, p:],
                                     0.0))
  for a, b in zip(jax.tree.leaves(jax.grad(shared)(params)), jax.tree.leaves(jax.grad(full)(params))):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="group_size"):
    M.completion_logps(model, params, prompt, pmask, comp, cmask, group_size=2)


def test_token_logps_grad_matches_unchunked():
  model = M.from_config(LLAMA)
  params = model.init(jax.random.key(1))

  def chunked(p):
    return M.token_logps(model, p, IDS, MASK, chunk_size=4)[0].sum()

  def dense(p):
    lg = jax.nn.log_softmax(model.apply(p, IDS, attention_mask=MASK)[:, :-1], -1)
    return jnp.take_along_axis(lg, IDS[:, 1:, None], -1).sum()

  g1, g2 = jax.grad(chunked)(params), jax.grad(dense)(params)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_token_logps_peak_memory_below_full_logits():
  cfg = dict(LLAMA, vocab_size=8192, hidden_size=16, intermediate_size=32,
             num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1)
  model = M.from_config(cfg)
  params = jax.eval_shape(model.init, jax.random.key(0))
  b, t = 4, 128
  ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
  full_bytes = b * t * cfg["vocab_size"] * 4

  def f(p, i, m):
    return M.token_logps(model, p, i, m, chunk_size=16)

  temp = jax.jit(f).lower(params, ids, ids).compile().memory_analysis().temp_size_in_bytes
  assert temp < full_bytes / 2, (temp, full_bytes)

  def naive(p, i, m):  # same outputs, materialising the full log-softmax
    lg = jax.nn.log_softmax(model.apply(p, i, attention_mask=m).astype(jnp.float32), -1)
    return jnp.take_along_axis(lg[:, :-1], i[:, 1:, None], -1)[..., 0]

  temp_naive = jax.jit(naive).lower(params, ids, ids).compile().memory_analysis().temp_size_in_bytes
  assert temp_naive >= full_bytes  # the check above is meaningful for this config


def test_logical_axes_cover_params(lm):
  model, params = lm
  axes = model.logical_axes(params)
  allowed = {"layers", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm", None}
  is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
  flat_axes = jax.tree.leaves(axes, is_leaf=is_axes)
  flat_params = jax.tree.leaves(params)
  assert len(flat_axes) == len(flat_params)
  for a, p in zip(flat_axes, flat_params):
    assert len(a) == p.ndim and set(a) <= allowed
  assert axes["layers"]["attn"]["q_kernel"] == ("layers", "embed", "heads", "head_dim")
  assert M.logical_axes(model) == axes


def test_bf16_and_remat_run():
  model = M.from_config(LLAMA, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat=True)
  params = model.init(jax.random.key(0))
  assert params["embed"].dtype == jnp.bfloat16
  out = model.apply(params, IDS, attention_mask=MASK)
  assert out.dtype == jnp.bfloat16 and np.isfinite(np.asarray(out, np.float32)).all()
  ref = M.from_config(LLAMA).apply(jax.tree.map(lambda x: x.astype(jnp.float32), params),
                                   IDS, attention_mask=MASK)
  ref = np.asarray(ref)
  # bf16 rounding through two layers: relative L2 error 1.2-1.7% (CPU, four seeds)
  rel = np.linalg.norm(np.asarray(out, np.float32) - ref) / np.linalg.norm(ref)
  assert rel < 0.04, rel
  # remat changes memory, not values.
  f32 = M.from_config(LLAMA, remat=True)
  p32 = f32.init(jax.random.key(0))
  np.testing.assert_allclose(f32.apply(p32, IDS, attention_mask=MASK),
                             M.from_config(LLAMA).apply(p32, IDS, attention_mask=MASK),
                             atol=1e-6)


# ----------------------------------------------------------------------------- errors


def test_error_unknown_model_type():
  with pytest.raises(ValueError, match=r"model_type 'mamba'.*llama, qwen2, gemma, gpt2"):
    M.from_config(dict(LLAMA, model_type="mamba"))


def test_error_token_ids_out_of_vocab(lm):
  model, params = lm
  with pytest.raises(ValueError, match=rf"token id {V}.*vocab_size={V}"):
    model.apply(params, IDS.at[0, 4].set(V), attention_mask=MASK)
  with pytest.raises(ValueError, match="input_ids contains token id -1"):
    M.check_token_ids(np.array([[1, -1]]), V)
  M.check_token_ids(np.array([[0, V - 1]]), V)


def test_error_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
    M.load_hf(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    M.load_hf(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(LLAMA))
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match=r"model.safetensors.*only safetensors"):
    M.load_hf(str(tmp_path))


@pytest.fixture()
def saved_llama(tmp_path):
  model = M.from_config(LLAMA)
  M.save_hf(str(tmp_path), model, model.init(jax.random.key(0)))
  return tmp_path


def test_error_wrong_tensor_shape(saved_llama):
  from safetensors.numpy import load_file, save_file
  f = saved_llama / "model.safetensors"
  tensors = load_file(str(f))
  tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((65, 32), np.float32)
  save_file(tensors, str(f), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' has shape "
                     r"\(65, 32\).*expects \(64, 32\)"):
    M.load_hf(str(saved_llama))


def test_error_missing_tensor(saved_llama):
  from safetensors.numpy import load_file, save_file
  f = saved_llama / "model.safetensors"
  tensors = load_file(str(f))
  del tensors["model.norm.weight"]
  save_file(tensors, str(f), metadata={"format": "pt"})
  with pytest.raises(KeyError, match=r"missing tensor 'model.norm.weight'"):
    M.load_hf(str(saved_llama))


def test_save_hf_accepts_per_layer_params(tmp_path):
  model = M.from_config(LLAMA)
  params = model.init(jax.random.key(0))
  M.save_hf(str(tmp_path), model, M.unstack_layers(params))
  _, loaded = M.load_hf(str(tmp_path))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert M.stack_layers(M.unstack_layers(params)).keys() == params.keys()


def test_roundtrip_save_load_is_exact(saved_llama):
  model, params = M.load_hf(str(saved_llama))
  ref = M.from_config(LLAMA).init(jax.random.key(0))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(a, b)


def test_error_unsupported_rope_type():
  with pytest.raises(ValueError, match=r"rope_type 'yarn'.*default, linear, llama3"):
    M.from_config(dict(LLAMA, rope_parameters=dict(rope_type="yarn", factor=4.0)))


def test_last_index_is_each_rows_last_real_token():
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(jax.jit(M.last_index)(jnp.asarray(mask)), [2, 4, 3, 0])
  np.testing.assert_array_equal(M.last_index(jnp.asarray(mask, bool)), [2, 4, 3, 0])
