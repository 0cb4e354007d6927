"""Parity of rlhf_jax.models with transformers (torch CPU, tiny random models)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import rlhf_jax.models as M  # noqa: E402

V = 128
# Row 0: left padded, row 1: right padded (same tokens as row 0), row 2: unpadded.
_TOKENS = [5, 17, 99, 3, 42, 8]
IDS = np.array([[0, 0] + _TOKENS[:4], _TOKENS[:4] + [0, 0], _TOKENS], np.int64)
MASK = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1] * 6], np.int64)
POS = np.maximum(np.cumsum(MASK, 1) - 1, 0)

_LLAMA = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
CASES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(_LLAMA)),
    "llama3_tied_bias": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        _LLAMA, tie_word_embeddings=True, rope_theta=500000.0, attention_bias=True,
        mlp_bias=True,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=4))),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(_LLAMA)),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, dict(
        _LLAMA, num_key_value_heads=1, head_dim=16)),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, dict(
        vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        bos_token_id=1, eos_token_id=2)),
}


def _randomize(model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 and
                                                         p.shape[0] == 32 else 0.0))
  return model.eval()


def _torch_model(cfg_cls, model_cls, kw, seed=0):
  cfg = cfg_cls(**kw)
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  return _randomize(model_cls(cfg).to(torch.float32), seed)


def _torch_out(model, ids=IDS, mask=MASK):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))
                 ).logits.numpy()


def _max_err(a, b, mask=MASK):
  return float(np.abs(np.asarray(a) - np.asarray(b))[mask.astype(bool)].max())


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
  cfg_cls, model_cls, kw = CASES[request.param]
  tm = _torch_model(cfg_cls, model_cls, kw)
  d = tmp_path_factory.mktemp(request.param)
  tm.save_pretrained(d, safe_serialization=True)
  model, params = M.load_hf(str(d))
  return request.param, tm, model, params, d


def test_load_parity_left_and_right_padding(case):
  name, tm, model, params, _ = case
  ref = _torch_out(tm)
  out = np.asarray(model.apply(params, jnp.asarray(IDS), attention_mask=jnp.asarray(MASK)))
  assert out.shape == ref.shape
  assert _max_err(out, ref) < 1e-4, name
  # Padding invariance: left- and right-padded rows equal the unpadded row.
  np.testing.assert_allclose(out[0, 2:], out[2, :4], atol=1e-5)
  np.testing.assert_allclose(out[1, :4], out[2, :4], atol=1e-5)
  assert model.config.tie_embeddings == ("lm_head" not in params)


def test_save_hf_roundtrip_into_transformers(case, tmp_path):
  name, tm, model, params, _ = case
  M.save_hf(str(tmp_path), model, params)
  back = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), attn_implementation="eager", dtype=torch.float32)
  assert type(back) is type(tm)
  assert _max_err(_torch_out(back), _torch_out(tm)) < 1e-5, name


def test_llama3_rope_scaling_is_used():
  model = M.from_config(CASES["llama3_tied_bias"][2] | {"model_type": "llama"})
  sc = model.config.rope_scaling_dict
  assert sc["rope_type"] == "llama3" and sc["factor"] == 8.0
  plain = M.from_config(_LLAMA | {"model_type": "llama", "rope_theta": 500000.0})
  from rlhf_jax.models.decoder import rope_inv_freq
  assert not np.allclose(rope_inv_freq(model.config), rope_inv_freq(plain.config))


def test_sharded_checkpoint(tmp_path):
  cfg_cls, model_cls, kw = CASES["llama"]
  tm = _torch_model(cfg_cls, model_cls, kw, seed=3)
  tm.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  assert not (tmp_path / "model.safetensors").exists()
  model, params = M.load_hf(str(tmp_path))
  out = model.apply(params, jnp.asarray(IDS), attention_mask=jnp.asarray(MASK))
  assert _max_err(out, _torch_out(tm)) < 1e-4


@pytest.fixture(scope="module")
def reward_ckpt(tmp_path_factory):
  cfg = transformers.LlamaConfig(**_LLAMA, num_labels=1)
  cfg._attn_implementation = "eager"
  torch.manual_seed(1)
  tm = _randomize(transformers.LlamaForSequenceClassification(cfg).to(torch.float32), 1)
  d = tmp_path_factory.mktemp("rm")
  tm.save_pretrained(d, safe_serialization=True)
  return tm, d


def _torch_reward(tm):
  with torch.no_grad():
    return tm(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK),
              position_ids=torch.tensor(POS)).logits.numpy()[:, 0]


def test_sequence_classification_reward_parity_and_roundtrip(reward_ckpt, tmp_path):
  tm, d = reward_ckpt
  model, params = M.load_hf(str(d))
  assert model.head == "reward" and params["score"].shape == (32, 1)
  rewards = np.asarray(model.apply(params, jnp.asarray(IDS), attention_mask=jnp.asarray(MASK)))
  ref = _torch_reward(tm)
  assert rewards.shape == (3,)
  np.testing.assert_allclose(rewards, ref, atol=1e-4)
  np.testing.assert_allclose(rewards[0], rewards[1], atol=1e-5)  # same tokens, padded
  M.save_hf(str(tmp_path), model, params)
  back = transformers.AutoModelForSequenceClassification.from_pretrained(
      str(tmp_path), attn_implementation="eager", dtype=torch.float32)
  assert isinstance(back, transformers.LlamaForSequenceClassification)
  np.testing.assert_allclose(_torch_reward(back), ref, atol=1e-5)


def test_value_and_reward_heads_on_causal_lm_backbone(case):
  name, tm, model, params, d = case
  if name not in ("llama", "gpt2"):  # one per checkpoint naming scheme keeps this fast
    pytest.skip("covered by llama and gpt2")
  vm, vparams = M.load_hf(str(d), head="value", rng=jax.random.key(7))
  assert "lm_head" not in vparams and vparams["score"].shape == (32, 1)
  values = vm.apply(vparams, jnp.asarray(IDS), attention_mask=jnp.asarray(MASK))
  assert values.shape == IDS.shape
  h = model.hidden(params, jnp.asarray(IDS), jnp.asarray(MASK))
  np.testing.assert_allclose(values, (h @ vparams["score"])[..., 0], atol=1e-5)
  rm, rparams = M.load_hf(str(d), head="reward", rng=jax.random.key(7))
  rewards = rm.apply(rparams, jnp.asarray(IDS), attention_mask=jnp.asarray(MASK))
  last = np.array([5, 3, 5])
  np.testing.assert_allclose(rewards, np.asarray(values)[np.arange(3), last], atol=1e-5)
