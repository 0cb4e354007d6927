"""Greedy decoding equals transformers `generate(do_sample=False)` on a random-init tiny Llama."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
M = pytest.importorskip("rlhf_jax.models")
if not hasattr(M, "load_hf"):
  pytest.skip("rlhf_jax.models.load_hf is not available", allow_module_level=True)

from rlhf_jax.sampling import SamplingConfig, sample  # noqa: E402

NEW = 12


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
      rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
      bos_token_id=None, eos_token_id=None, pad_token_id=0)
  hf = transformers.LlamaForCausalLM(cfg).eval().to(torch.float32)
  path = tmp_path_factory.mktemp("tiny_llama")
  hf.save_pretrained(path)
  model, params = M.load_hf(str(path), dtype=jnp.float32)
  return hf, model, params


def _hf_greedy(hf, ids, mask):
  with torch.no_grad():
    out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
                      max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0,
                      eos_token_id=None)
  return out[:, ids.shape[1]:].numpy()


@pytest.mark.parametrize("padded", [False, True], ids=["same_length", "left_padded"])
def test_greedy_matches_transformers_generate(pair, padded):
  hf, model, params = pair
  rs = np.random.RandomState(1)
  ids = rs.randint(1, 64, size=(3, 7)).astype(np.int64)
  mask = np.ones_like(ids, bool)
  if padded:
    mask[1, :3] = False
    mask[2, :5] = False
    ids[~mask] = 0
  expect = _hf_greedy(hf, ids, mask)
  config = SamplingConfig(max_new_tokens=NEW, temperature=0.0, pad_id=0)
  out = jax.jit(sample, static_argnums=(0, 5))(model, params, jnp.asarray(ids, jnp.int32),
                                               jnp.asarray(mask), jax.random.key(0), config)
  np.testing.assert_array_equal(np.asarray(out.completion_ids), expect)
