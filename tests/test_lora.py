"""LoRA adapters: exact identity at init, merge math, training only adapters, exports."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rlhf_jax.models as M
from rlhf_jax.models import lora

V = 64
LLAMA = dict(model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=48,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, initializer_range=0.3, rms_norm_eps=1e-6,
             tie_word_embeddings=False)
GPT2 = dict(model_type="gpt2", vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32,
            initializer_range=0.3)
IDS = jnp.array([[0, 0, 5, 7, 8, 9, 10, 11], [1, 2, 3, 4, 5, 6, 7, 8]], jnp.int32)
MASK = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8], jnp.int32)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def llama():
  model = M.from_config(LLAMA)
  return model, model.init(jax.random.key(0))


def _nonzero(lora_params, seed=1):
  """Adapters with a random B (fresh ones have B = 0)."""
  leaves, tree = jax.tree_util.tree_flatten_with_path(lora_params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = [x if p[-1].key == "a" else 0.3 * jax.random.normal(k, x.shape, x.dtype)
         for (p, x), k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(tree, out)


def test_fresh_adapters_leave_the_model_exactly_unchanged(llama):
  model, params = llama
  lp = lora.init(jax.random.key(2), model, params, RANK, ALPHA, ALL)
  assert all(float(jnp.abs(ab["b"]).max()) == 0.0
             for mod in lp["layers"].values() for ab in mod.values())
  merged = jax.jit(lora.apply_params, static_argnums=(2,))(params, lp, ALPHA)
  np.testing.assert_array_equal(model.apply(merged, IDS, MASK), model.apply(params, IDS, MASK))


def test_shapes_and_merge_math(llama):
  model, params = llama
  lp = _nonzero(lora.init(jax.random.key(2), model, params, RANK, ALPHA, ALL))
  cfg = model.config
  d, h, kh, hd, f, L = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.intermediate_size, cfg.num_layers)
  want = {"q_kernel": (d, h * hd), "k_kernel": (d, kh * hd), "v_kernel": (d, kh * hd),
          "o_kernel": (h * hd, d), "gate_kernel": (d, f), "up_kernel": (d, f),
          "down_kernel": (f, d)}
  merged = lora.apply_params(params, lp, ALPHA, RANK)
  for name, (din, dout) in want.items():
    mod = lora.TARGETS[name][0]
    ab = lp["layers"][mod][name]
    assert ab["a"].shape == (L, din, RANK) and ab["b"].shape == (L, RANK, dout)
    w = np.asarray(params["layers"][mod][name], np.float64)
    a, b = np.asarray(ab["a"], np.float64), np.asarray(ab["b"], np.float64)
    ref = w + (ALPHA / RANK) * np.einsum("lir,lro->lio", a, b).reshape(w.shape)
    np.testing.assert_allclose(merged["layers"][mod][name], ref, atol=1e-5)
  # Parameters that are not targets are the very same arrays.
  assert merged["embed"] is params["embed"]
  assert merged["layers"]["attn_norm"]["scale"] is params["layers"]["attn_norm"]["scale"]
  # The per-layer layout merges to the same values.
  per = lora.apply_params(M.unstack_layers(params), lp, ALPHA)
  for x, y in zip(jax.tree.leaves(M.stack_layers(per)), jax.tree.leaves(merged), strict=True):
    np.testing.assert_allclose(x, y, atol=1e-6)
  np.testing.assert_allclose(model.apply(per, IDS, MASK), model.apply(merged, IDS, MASK),
                             atol=1e-5)


@pytest.mark.parametrize("hf, per_layer", [(LLAMA, True), (GPT2, False)],
                         ids=["llama-per_layer", "gpt2-stacked"])
def test_attached_adapters_equal_merged_weights_with_thin_gradients(hf, per_layer):
  """`lora.attach` (x W + x A (s B), what the training passes use) gives the merged model's
  log-probs and the same gradient with respect to the adapters, in float64-checked math:
  the adapters' gradient equals the chain rule through the merged kernel."""
  model = M.from_config(hf)
  params = model.init(jax.random.key(0))
  targets = lora.valid_targets(model, params)
  lp = _nonzero(lora.init(jax.random.key(2), model, params, RANK, ALPHA, targets))
  if per_layer:
    params = M.unstack_layers(params)
  f = lambda l, how: jnp.sum(M.token_logps(model, how(params, l, ALPHA), IDS, MASK)[0])  # noqa: E731
  v_m, g_m = jax.jit(jax.value_and_grad(f), static_argnums=1)(lp, lora.apply_params)
  v_a, g_a = jax.jit(jax.value_and_grad(f), static_argnums=1)(lp, lora.attach)
  np.testing.assert_allclose(float(v_a), float(v_m), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_a), jax.tree.leaves(g_m), strict=True):
    b = np.asarray(b)
    np.testing.assert_allclose(np.asarray(a), b, atol=1e-5 * max(1.0, np.abs(b).max()))
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_a)) > 1e-3
  # Fresh adapters (B = 0) attached: exactly the base model.
  fresh = lora.init(jax.random.key(2), model, params, RANK, ALPHA, targets)
  np.testing.assert_array_equal(model.apply(lora.attach(params, fresh, ALPHA), IDS, MASK),
                                model.apply(params, IDS, MASK))


def test_target_names(llama):
  model, params = llama
  assert lora.resolve_targets(model, ("v_proj", "q_kernel")) == ("q_kernel", "v_kernel")
  lp = lora.init(jax.random.key(0), model, params, 2, 4.0, ("q_proj", "down_kernel"))
  assert {(m, n) for m, ks in lp["layers"].items() for n in ks} == {
      ("attn", "q_kernel"), ("mlp", "down_kernel")}
  with pytest.raises(ValueError, match=r"LoRA targets \['w_proj'\] match no parameter of "
                                       r"this llama model; valid targets: q_kernel, k_kernel, "
                                       r"v_kernel, o_kernel, gate_kernel, up_kernel, "
                                       r"down_kernel \(or q_proj, .*down_proj\)"):
    lora.init(jax.random.key(0), model, params, 2, 4.0, ("q_proj", "w_proj"))
  gpt2 = M.from_config(GPT2)
  with pytest.raises(ValueError, match=r"\['gate_proj'\] match no parameter of this gpt2 "
                                       r"model; valid targets: q_kernel, k_kernel, v_kernel, "
                                       r"o_kernel, up_kernel, down_kernel"):
    lora.init(jax.random.key(0), gpt2, None, 2, 4.0, ("gate_proj",))
  with pytest.raises(ValueError, match=r"rank must be a positive int, got 0"):
    lora.init(jax.random.key(0), model, params, 0, 4.0)
  with pytest.raises(ValueError, match=r"alpha must be a positive number, got -1"):
    lora.init(jax.random.key(0), model, params, 2, -1)
  with pytest.raises(ValueError, match=r"rank=3 but the adapters have rank 2"):
    lora.apply_params(params, lora.init(jax.random.key(0), model, params, 2, 4.0), 4.0, 3)


def _loss(model, params):
  def loss(lora_params):
    merged = lora.apply_params(params, lora_params, ALPHA)
    lp, _ = M.token_logps(model, merged, IDS, MASK)
    return -jnp.sum(lp * MASK)
  return loss


def test_only_adapters_train(llama):
  model, params = llama
  lp = lora.init(jax.random.key(3), model, params, RANK, ALPHA, ("q_proj", "v_proj", "up_proj"))
  # Gradient w.r.t. the adapters alone: with B = 0, A gets none and B does.
  g = jax.jit(jax.grad(_loss(model, params)))(lp)
  for ab in (x for mod in g["layers"].values() for x in mod.values()):
    assert float(jnp.abs(ab["a"]).max()) == 0.0 and float(jnp.abs(ab["b"]).max()) > 0.0
  # One tree holding both: freeze_base updates the adapters and leaves the base as is.
  state = {"base": params, "lora": lp}
  mask = lora.trainable_mask(state)
  assert not any(jax.tree.leaves(mask["base"])) and all(jax.tree.leaves(mask["lora"]))
  tx = lora.freeze_base(optax.adam(1e-2))
  opt_state = tx.init(state)
  loss = lambda s: _loss(model, s["base"])(s["lora"])  # noqa: E731

  @jax.jit
  def step(state, opt_state):
    grads = jax.grad(loss)(state)
    updates, opt_state = tx.update(grads, opt_state, state)
    return optax.apply_updates(state, updates), opt_state

  new = state
  for _ in range(3):
    new, opt_state = step(new, opt_state)
  for x, y in zip(jax.tree.leaves(new["base"]), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(x, y)
  assert float(loss(new)) < float(loss(state))
  # The reference policy is the base params: adapters off, no second copy.
  np.testing.assert_array_equal(model.apply(new["base"], IDS, MASK),
                                model.apply(params, IDS, MASK))


def _torch_logits(path, ids, adapter=None):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      path, torch_dtype=torch.float32, attn_implementation="eager")
  if adapter is not None:
    peft = pytest.importorskip("peft")
    hf = peft.PeftModel.from_pretrained(hf, adapter)
  with torch.no_grad():
    return hf.eval()(input_ids=torch.tensor(np.asarray(ids))).logits.numpy()


def test_export_merged_loads_in_transformers(llama, tmp_path):
  pytest.importorskip("torch")
  model, params = llama
  lp = _nonzero(lora.init(jax.random.key(4), model, params, RANK, ALPHA, ALL))
  lora.export_merged(str(tmp_path / "merged"), model, params, lp, ALPHA)
  ids = IDS[1:]
  ours = np.asarray(model.apply(lora.apply_params(params, lp, ALPHA), ids))
  theirs = _torch_logits(str(tmp_path / "merged"), ids)
  np.testing.assert_allclose(theirs, ours, atol=1e-4)
  assert np.abs(ours - np.asarray(model.apply(params, ids))).max() > 1e-2  # adapters matter


def test_export_peft_layout_and_load(llama, tmp_path):
  model, params = llama
  lp = _nonzero(lora.init(jax.random.key(5), model, params, RANK, ALPHA, ALL))
  out = str(tmp_path / "adapter")
  lora.export_peft(out, model, lp, ALPHA, base_model_name_or_path="base")
  from safetensors.numpy import load_file
  tensors = load_file(os.path.join(out, "adapter_model.safetensors"))
  cfg = model.config
  assert len(tensors) == 2 * len(ALL) * cfg.num_layers
  pre = "base_model.model.model.layers.1."
  assert tensors[pre + "self_attn.q_proj.lora_A.weight"].shape == (RANK, cfg.hidden_size)
  assert tensors[pre + "self_attn.q_proj.lora_B.weight"].shape == (
      cfg.num_heads * cfg.head_dim, RANK)
  assert tensors[pre + "self_attn.o_proj.lora_A.weight"].shape == (
      RANK, cfg.num_heads * cfg.head_dim)
  assert tensors[pre + "mlp.down_proj.lora_B.weight"].shape == (cfg.hidden_size, RANK)
  np.testing.assert_array_equal(tensors[pre + "mlp.up_proj.lora_A.weight"],
                                np.asarray(lp["layers"]["mlp"]["up_kernel"]["a"][1]).T)
  with open(os.path.join(out, "adapter_config.json")) as f:
    conf = json.load(f)
  assert (conf["peft_type"], conf["task_type"], conf["r"], conf["lora_alpha"]) == (
      "LORA", "CAUSAL_LM", RANK, ALPHA)
  assert sorted(conf["target_modules"]) == sorted(ALL)

  pytest.importorskip("peft")
  M.save_hf(str(tmp_path / "base"), model, params)
  ids = IDS[1:]
  ours = np.asarray(model.apply(lora.apply_params(params, lp, ALPHA), ids))
  theirs = _torch_logits(str(tmp_path / "base"), ids, adapter=out)
  np.testing.assert_allclose(theirs, ours, atol=1e-4)


def test_export_peft_refuses_fused_qkv_and_scalar_heads(llama, tmp_path):
  gpt2 = M.from_config(GPT2)
  lp = lora.init(jax.random.key(0), gpt2, None, 2, 4.0, ("q_kernel",))
  with pytest.raises(ValueError, match=r"GPT-2 fuses q/k/v into one c_attn"):
    lora.export_peft(str(tmp_path / "a"), gpt2, lp, 4.0)
  model, params = llama
  lp = lora.init(jax.random.key(0), model, params, 2, 4.0)
  with pytest.raises(ValueError, match=r"head='reward' \(use export_merged\)"):
    lora.export_peft(str(tmp_path / "b"), model.with_head("reward"), lp, 4.0)
