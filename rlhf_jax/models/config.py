"""Decoder configuration: one dataclass covering Llama, Qwen2, Gemma and GPT-2.

`DecoderConfig` is frozen and hashable so models built from it can be closed over
by `jax.jit` or passed as static arguments. `config_from_hf` reads a transformers
`config.json` dictionary; `config_to_hf` writes one back.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from rlhf_jax.models.attention import BACKENDS as ATTENTION_BACKENDS

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "gemma", "gpt2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

_ARCH_NAMES = {
    "llama": "Llama",
    "qwen2": "Qwen2",
    "gemma": "Gemma",
    "gpt2": "GPT2",
}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Architecture hyper-parameters of a decoder-only transformer.

  Arch flags: `norm_kind` in {"rms", "rms_plus1", "layer"}; `mlp_kind` in
  {"swiglu", "geglu", "gelu"}; `position_kind` in {"rope", "learned"};
  `qkv_bias`/`o_bias`/`mlp_bias` add biases; `embed_scale` multiplies token
  embeddings by sqrt(hidden_size) (Gemma).
  """

  model_type: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  rope_theta: float = 10000.0
  rope_scaling: tuple = ()  # sorted (key, value) items; () means default RoPE
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  max_position_embeddings: int = 2048
  norm_kind: str = "rms"
  mlp_kind: str = "swiglu"
  position_kind: str = "rope"
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  embed_scale: bool = False
  pad_token_id: int | None = None
  hf_config_json: str = "{}"  # the original transformers config, for save_hf
  # Attention backend (see `rlhf_jax.models.attention`): "auto", "xla", "chunked",
  # "cudnn" (GPU) or "splash" (TPU); block length of the chunked backend.
  attention: str = "auto"
  attention_chunk: int = 512

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
          f"({self.num_kv_heads}); fix num_key_value_heads in the config.")
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                 "head_dim", "intermediate_size"):
      if getattr(self, name) <= 0:
        raise ValueError(f"DecoderConfig.{name} must be positive, got "
                         f"{getattr(self, name)}.")
    if self.attention not in ATTENTION_BACKENDS:
      raise ValueError(f"DecoderConfig.attention={self.attention!r} is unknown; choose one "
                       f"of {', '.join(ATTENTION_BACKENDS)}.")
    chunk = self.attention_chunk
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
      raise ValueError(f"DecoderConfig.attention_chunk must be a positive int, got "
                       f"{chunk!r}.")

  @property
  def position_key(self) -> str:
    """The config.json key of `max_position_embeddings` ("n_positions" for GPT-2)."""
    return "n_positions" if self.model_type == "gpt2" else "max_position_embeddings"

  def check_sequence_length(self, length: int, *, what: str, fix: str) -> None:
    """Raises ValueError when sequences of `length` tokens need more positions than the
    model has (`max_position_embeddings`).

    Positions past it were never trained: RoPE models (Llama, Qwen2, Gemma) run on
    silently with degraded outputs, and GPT-2's learned position table has no row for
    them (NaN). `what` names the setting that gives `length`, `fix` says what to change.
    """
    if int(length) > self.max_position_embeddings:
      raise ValueError(
          f"{what} = {int(length)} tokens, more than the model's {self.position_key}="
          f"{self.max_position_embeddings} ({self.model_type} config): positions >= "
          f"{self.max_position_embeddings} were never trained; {fix}")

  @property
  def rope_scaling_dict(self) -> dict[str, Any]:
    return dict(self.rope_scaling)

  @property
  def hf_config(self) -> dict[str, Any]:
    return json.loads(self.hf_config_json)


def _rope_params(hf: dict[str, Any]) -> tuple[float, tuple]:
  """Returns (rope_theta, scaling items) from v4 (`rope_scaling`) or v5 (`rope_parameters`)."""
  params = dict(hf.get("rope_parameters") or {})
  legacy = hf.get("rope_scaling") or {}
  for k, v in legacy.items():
    params.setdefault(k, v)
  theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
  rope_type = params.pop("rope_type", params.pop("type", "default")) or "default"
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise ValueError(
        f"rope_type {rope_type!r} is not supported; supported rope types: "
        f"{', '.join(SUPPORTED_ROPE_TYPES)}.")
  if rope_type == "default":
    return theta, ()
  params["rope_type"] = rope_type
  keep = {k: v for k, v in params.items()
          if isinstance(v, (int, float, str)) and v is not None}
  return theta, tuple(sorted(keep.items()))


def config_from_hf(hf: dict[str, Any]) -> DecoderConfig:
  """Builds a `DecoderConfig` from a transformers config dictionary."""
  if not isinstance(hf, dict):
    if hasattr(hf, "to_dict"):
      hf = hf.to_dict()
    else:
      raise TypeError(f"hf_config must be a dict, got {type(hf).__name__}.")
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(
        f"Unknown model_type {model_type!r} in the config; supported model_type "
        f"values: {', '.join(SUPPORTED_MODEL_TYPES)}.")
  blob = json.dumps(hf, sort_keys=True, default=str)
  pad = hf.get("pad_token_id")
  if model_type == "gpt2":
    d = hf["n_embd"]
    n_heads = hf["n_head"]
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
      raise ValueError(f"gpt2 activation_function {act!r} not supported; use gelu_new.")
    return DecoderConfig(
        model_type=model_type, vocab_size=hf["vocab_size"], hidden_size=d,
        num_layers=hf["n_layer"], num_heads=n_heads, num_kv_heads=n_heads,
        head_dim=d // n_heads, intermediate_size=hf.get("n_inner") or 4 * d,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=True, max_position_embeddings=hf.get("n_positions", 1024),
        norm_kind="layer", mlp_kind="gelu", position_kind="learned",
        qkv_bias=True, o_bias=True, mlp_bias=True, pad_token_id=pad,
        hf_config_json=blob)
  d = hf["hidden_size"]
  n_heads = hf["num_attention_heads"]
  theta, scaling = _rope_params(hf)
  common = dict(
      model_type=model_type, vocab_size=hf["vocab_size"], hidden_size=d,
      num_layers=hf["num_hidden_layers"], num_heads=n_heads,
      num_kv_heads=hf.get("num_key_value_heads") or n_heads,
      head_dim=hf.get("head_dim") or d // n_heads,
      intermediate_size=hf["intermediate_size"], rope_theta=theta,
      rope_scaling=scaling, norm_eps=hf.get("rms_norm_eps", 1e-6),
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      pad_token_id=pad, hf_config_json=blob)
  if model_type == "gemma":
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu"):
      raise ValueError(f"gemma hidden_activation {act!r} not supported.")
    return DecoderConfig(
        **common, tie_embeddings=hf.get("tie_word_embeddings", True),
        norm_kind="rms_plus1", mlp_kind="geglu", embed_scale=True,
        qkv_bias=bool(hf.get("attention_bias", False)),
        o_bias=bool(hf.get("attention_bias", False)))
  act = hf.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    raise ValueError(f"{model_type} hidden_act {act!r} not supported; use silu.")
  if model_type == "qwen2":
    if hf.get("use_sliding_window"):
      raise ValueError("qwen2 use_sliding_window=True is not supported; set it False.")
    return DecoderConfig(
        **common, tie_embeddings=hf.get("tie_word_embeddings", False),
        qkv_bias=True)
  attn_bias = bool(hf.get("attention_bias", False))
  return DecoderConfig(
      **common, tie_embeddings=hf.get("tie_word_embeddings", False),
      qkv_bias=attn_bias, o_bias=attn_bias,
      mlp_bias=bool(hf.get("mlp_bias", False)))


def config_to_hf(cfg: DecoderConfig, *, head: str, dtype_name: str) -> dict[str, Any]:
  """Returns a transformers config dictionary (CausalLM or SequenceClassification)."""
  hf = cfg.hf_config
  hf.pop("transformers_version", None)
  hf["model_type"] = cfg.model_type
  base = _ARCH_NAMES[cfg.model_type]
  if head == "lm":
    hf["architectures"] = [f"{base}LMHeadModel" if cfg.model_type == "gpt2"
                           else f"{base}ForCausalLM"]
  else:
    hf["architectures"] = [f"{base}ForSequenceClassification"]
    hf["num_labels"] = 1
    hf["id2label"] = {"0": "LABEL_0"}
    hf["label2id"] = {"LABEL_0": 0}
    if cfg.pad_token_id is not None:
      hf["pad_token_id"] = cfg.pad_token_id
  hf["vocab_size"] = cfg.vocab_size
  hf["tie_word_embeddings"] = cfg.tie_embeddings
  hf["dtype"] = dtype_name
  return hf


def default_init_std(cfg: DecoderConfig) -> float:
  std = cfg.hf_config.get("initializer_range")
  return float(std) if std else 1.0 / math.sqrt(cfg.hidden_size)
