"""transformers checkpoint I/O (safetensors only): `load_hf` and `save_hf`.

Reads `config.json` plus `model.safetensors` or a sharded
`model.safetensors.index.json`; writes `model.safetensors` + `config.json` that
transformers' `*ForCausalLM` / `GPT2LMHeadModel` / `*ForSequenceClassification`
load. Per-layer tensors are stacked along a leading layer axis; linear weights
are transposed from torch's [out, in] layout (GPT-2's Conv1D is already [in, out]).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.config import config_to_hf
from rlhf_jax.models.model import Model, from_config, stack_layers

# Param path (within a layer, or top level) -> (hf name, kind, n_in_dims).
# kind: "table" ([rows, D] as is), "same" (flattened vector), "linear" (torch [out, in]), "conv" (Conv1D [in, out]),
# "fused<j>" (GPT-2 c_attn: part j of the [.., 3D] tensor, Conv1D layout).
_LLAMA_LAYER = {
    ("attn_norm", "scale"): ("input_layernorm.weight", "same", 0),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", "same", 0),
    ("attn", "o_kernel"): ("self_attn.o_proj.weight", "linear", 2),
    ("attn", "o_bias"): ("self_attn.o_proj.bias", "same", 0),
}
for _n in "qkv":
  _LLAMA_LAYER[("attn", f"{_n}_kernel")] = (f"self_attn.{_n}_proj.weight", "linear", 1)
  _LLAMA_LAYER[("attn", f"{_n}_bias")] = (f"self_attn.{_n}_proj.bias", "same", 0)
for _n in ("gate", "up", "down"):
  _LLAMA_LAYER[("mlp", f"{_n}_kernel")] = (f"mlp.{_n}_proj.weight", "linear", 1)
  _LLAMA_LAYER[("mlp", f"{_n}_bias")] = (f"mlp.{_n}_proj.bias", "same", 0)
_LLAMA_TOP = {
    ("embed",): ("embed_tokens.weight", "table", 0),
    ("final_norm", "scale"): ("norm.weight", "same", 0),
}

_GPT2_LAYER = {
    ("attn_norm", "scale"): ("ln_1.weight", "same", 0),
    ("attn_norm", "bias"): ("ln_1.bias", "same", 0),
    ("mlp_norm", "scale"): ("ln_2.weight", "same", 0),
    ("mlp_norm", "bias"): ("ln_2.bias", "same", 0),
    ("attn", "o_kernel"): ("attn.c_proj.weight", "conv", 2),
    ("attn", "o_bias"): ("attn.c_proj.bias", "same", 0),
    ("mlp", "up_kernel"): ("mlp.c_fc.weight", "conv", 1),
    ("mlp", "up_bias"): ("mlp.c_fc.bias", "same", 0),
    ("mlp", "down_kernel"): ("mlp.c_proj.weight", "conv", 1),
    ("mlp", "down_bias"): ("mlp.c_proj.bias", "same", 0),
}
for _j, _n in enumerate("qkv"):
  _GPT2_LAYER[("attn", f"{_n}_kernel")] = ("attn.c_attn.weight", f"fused{_j}", 1)
  _GPT2_LAYER[("attn", f"{_n}_bias")] = ("attn.c_attn.bias", f"fused{_j}", 0)
_GPT2_TOP = {
    ("embed",): ("wte.weight", "table", 0),
    ("pos_embed",): ("wpe.weight", "table", 0),
    ("final_norm", "scale"): ("ln_f.weight", "same", 0),
    ("final_norm", "bias"): ("ln_f.bias", "same", 0),
}
_HEADS = {
    ("lm_head",): ("lm_head.weight", "linear", 1),
    ("score",): ("score.weight", "linear", 1),
}


def _tables(model_type: str):
  if model_type == "gpt2":
    return "transformer.", "h.{i}.", _GPT2_LAYER, _GPT2_TOP
  return "model.", "layers.{i}.", _LLAMA_LAYER, _LLAMA_TOP


def _hf_shape(pshape, kind, n_in):
  """Shape of the HF tensor that holds a parameter of shape `pshape`."""
  if kind == "table":
    return tuple(pshape)
  if kind == "same":
    return (math.prod(pshape),)
  n_in_size = math.prod(pshape[:n_in])
  n_out = math.prod(pshape[n_in:])
  if kind == "linear":
    return (n_out, n_in_size)
  if kind == "conv":
    return (n_in_size, n_out)
  # fused: 3 equal parts along the last axis
  return (n_in_size, 3 * n_out) if n_in else (3 * n_out,)


def _to_param(x: np.ndarray, pshape, kind, n_in) -> np.ndarray:
  if kind == "linear":
    x = x.T
  elif kind.startswith("fused"):
    j = int(kind[-1])
    size = x.shape[-1] // 3
    x = x[..., j * size:(j + 1) * size]
  return x.reshape(pshape)


def _from_param(p: np.ndarray, kind, n_in) -> np.ndarray:
  n_in_size = math.prod(p.shape[:n_in])
  if kind == "table":
    return p
  if kind == "same":
    return p.reshape(-1)
  flat = p.reshape(n_in_size, -1) if n_in else p.reshape(-1)
  return np.ascontiguousarray(flat.T) if kind == "linear" else flat


# ----------------------------------------------------------------------------- files


class _TensorFiles:
  """Lazy name -> tensor access over one or several safetensors files."""

  def __init__(self, path: str):
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      self.where = {k: os.path.join(path, v) for k, v in weight_map.items()}
      for fname in set(self.where.values()):
        if not os.path.exists(fname):
          raise FileNotFoundError(f"Shard {fname} listed in {index} does not exist.")
      self.desc = index
    elif os.path.exists(single):
      from safetensors import safe_open
      with safe_open(single, framework="numpy") as f:
        self.where = {k: single for k in f.keys()}
      self.desc = single
    else:
      others = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth"))]
      hint = (f" Found {others}: only safetensors is read (convert with "
              f"save_pretrained(safe_serialization=True)).") if others else ""
      raise FileNotFoundError(
          f"No weights in {path}: expected {single} or {index}.{hint}")
    self._open: dict[str, Any] = {}

  def has(self, name: str) -> bool:
    return name in self.where

  def get(self, name: str) -> np.ndarray:
    from safetensors import safe_open
    fname = self.where[name]
    if fname not in self._open:
      self._open[fname] = safe_open(fname, framework="flax")
    return np.asarray(self._open[fname].get_tensor(name))


# Tensors a checkpoint may hold that carry no parameter: rotary frequency buffers (older
# Llama checkpoints) and GPT-2's causal-mask buffers.
_BUFFERS = re.compile(r"(rotary_emb\.inv_freq|(^|\.)h\.\d+\.attn\.(masked_)?bias)$")
_LLAMA_STYLE = ("llama", "qwen2", "gemma")


def _weights_family(names) -> tuple[str | None, str | None]:
  """("gpt2" | "llama-style", an example tensor) judged from the tensor names, or Nones."""
  for n in names:
    if re.search(r"(^|\.)(h\.\d+\.attn\.c_attn|wte)\.weight$", n):
      return "gpt2", n
  for n in names:
    if re.search(r"(^|\.)layers\.\d+\.self_attn\.q_proj\.weight$", n):
      return "llama-style", n
  return None, None


def _check_model_type(hf: dict, files: "_TensorFiles", cfg_path: str) -> None:
  """Raises ValueError naming both when config.json's model_type does not match the
  architecture the tensor names show (GPT-2 vs Llama-style)."""
  model_type = hf.get("model_type")
  family, example = _weights_family(files.where)
  if family is None:
    return
  if (family == "gpt2") != (model_type == "gpt2"):
    want = "'gpt2'" if family == "gpt2" else " or ".join(repr(t) for t in _LLAMA_STYLE)
    raise ValueError(
        f"{cfg_path} says model_type={model_type!r} but the weights in {files.desc} are "
        f"{family} (e.g. tensor {example!r}); set model_type to {want} in config.json (or use "
        "the config.json that was saved with these weights)")


def _unused_hint(unused, hf: dict, model) -> str:
  """Why tensors are left over: more layers than config.json says, or attention biases."""
  layers = [int(m.group(2)) for n in unused
            for m in [re.search(r"(^|\.)(?:layers|h)\.(\d+)\.", n)] if m]
  key = "n_layer" if model.config.model_type == "gpt2" else "num_hidden_layers"
  if layers and max(layers) >= model.config.num_layers:
    return (f"the file has layers up to index {max(layers)} but config.json {key}="
            f"{model.config.num_layers}; set {key}={max(layers) + 1}")
  if all(re.search(r"_proj\.bias$", n) for n in unused) and model.config.model_type == "llama":
    return ("the file has attention biases: the weights may be qwen2 (model_type='qwen2') or "
            "a llama with attention_bias=True")
  return (f"config.json (model_type={hf.get('model_type')!r}) describes another "
          "architecture or size than the weights; fix it, or remove the tensors")


def _read_config(path: str) -> dict:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"Checkpoint directory {path} does not exist.")
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"Missing {cfg_path}: a transformers checkpoint needs config.json.")
  with open(cfg_path) as f:
    return json.load(f)


def _leaf_paths(tree) -> list[tuple[tuple[str, ...], Any]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(tuple(k.key for k in path), leaf) for path, leaf in flat]


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _mapping(model: Model, path: tuple[str, ...]):
  """(hf name template, kind, n_in, is_layer) for a parameter path."""
  prefix, layer_fmt, layer_tab, top_tab = _tables(model.config.model_type)
  if path[0] == "layers":
    name, kind, n_in = layer_tab[path[1:]]
    return prefix + layer_fmt + name, kind, n_in, True
  if path in _HEADS:
    return (*_HEADS[path], False)
  name, kind, n_in = top_tab[path]
  return prefix + name, kind, n_in, False


# ----------------------------------------------------------------------------- load


def params_from_tensors(model: Model, fetch, param_dtype, *, rng: jax.Array | None = None,
                        fresh_score: bool = False) -> dict:
  """Builds params from transformers-named tensors.

  `fetch(name, hf_shape) -> np.ndarray` returns the tensor called `name` (raising a
  clear error when it is missing or has another shape). Per-layer tensors are
  stacked on the leading layer axis. With `fresh_score`, the scalar head is
  initialised from `rng` instead of fetched.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  pd = np.dtype(jnp.dtype(param_dtype))
  params: dict = {}
  for ppath, leaf in _leaf_paths(shapes):
    template, kind, n_in, is_layer = _mapping(model, ppath)
    if ppath == ("score",) and fresh_score:
      _set(params, ppath, model.init_score(jax.random.key(0) if rng is None else rng))
      continue
    pshape = leaf.shape[1:] if is_layer else leaf.shape
    hshape = _hf_shape(pshape, kind, n_in)
    idx = range(model.config.num_layers) if is_layer else [None]
    parts = [_to_param(fetch(template.format(i=i), hshape), pshape, kind, n_in) for i in idx]
    arr = np.stack(parts) if is_layer else parts[0]
    _set(params, ppath, jnp.asarray(arr.astype(pd)))
  return params


def load_hf(path: str, *, dtype=jnp.float32, param_dtype=None, head: str | None = None,
            remat: bool = False, rng: jax.Array | None = None,
            require_score: bool = False) -> tuple[Model, dict]:
  """Loads a transformers safetensors checkpoint as (Model, params).

  head: "lm", "value" or "reward"; default "reward" for *ForSequenceClassification
  checkpoints, else "lm". A missing `score.weight` gets a fresh head from `rng`, or is a
  ValueError with `require_score` (loading a trained reward / value model).

  Errors name the files: a config.json whose model_type is not the weights' architecture
  (GPT-2 vs Llama-style tensor names), a tensor whose shape disagrees with config.json, a
  missing tensor, and tensors config.json does not use (e.g. an extra layer; buffers such
  as `rotary_emb.inv_freq`, and an `lm_head` next to tied embeddings, are ignored).
  """
  hf = _read_config(path)
  if head is None:
    archs = hf.get("architectures") or []
    head = "reward" if any("SequenceClassification" in a for a in archs) else "lm"
  param_dtype = dtype if param_dtype is None else param_dtype
  files = _TensorFiles(path)
  cfg_path = os.path.join(path, "config.json")
  _check_model_type(hf, files, cfg_path)  # before reading config.json's other keys
  model = from_config(hf, dtype=dtype, param_dtype=param_dtype, remat=remat, head=head)
  used: set[str] = set()

  def fetch(name: str, hf_shape):
    cands = [name]
    if name.startswith(("model.", "transformer.")):
      cands.append(name.split(".", 1)[1])  # bare backbone checkpoint (no prefix)
    for cand in cands:
      if files.has(cand):
        used.add(cand)
        x = files.get(cand)
        if tuple(x.shape) != tuple(hf_shape):
          raise ValueError(
              f"Checkpoint tensor {cand!r} has shape {tuple(x.shape)} but the config "
              f"expects {tuple(hf_shape)} (in {files.desc}); config.json and weights "
              f"disagree.")
        return x
    raise KeyError(f"Checkpoint {files.desc} is missing tensor {name!r} needed for "
                   f"model_type={model.config.model_type!r} (as {cfg_path} says); check that "
                   "config.json matches the weights.")

  fresh_score = not files.has("score.weight")
  if fresh_score and require_score and head != "lm":
    raise ValueError(f"{files.desc} has no 'score.weight': it is not a trained {head} model "
                     "(a *ForSequenceClassification checkpoint, e.g. saved by the offline "
                     "reward_model loop with export_hf=True)")
  params = params_from_tensors(model, fetch, param_dtype, rng=rng, fresh_score=fresh_score)
  unused = sorted(n for n in files.where if n not in used and not _ignorable(n, model))
  if unused:
    shown = ", ".join(repr(n) for n in unused[:6]) + (
        f" and {len(unused) - 6} more" if len(unused) > 6 else "")
    raise ValueError(f"{files.desc} has {len(unused)} tensor(s) that {cfg_path} does not use: "
                     f"{shown}; {_unused_hint(unused, hf, model)}")
  return model, params


def _ignorable(name: str, model: Model) -> bool:
  """Tensors that may be left over without being an error: buffers (no parameter), an
  `lm_head` stored next to tied embeddings or under a reward / value head, a `score`
  head under an LM head (the head is chosen by the caller)."""
  if _BUFFERS.search(name):
    return True
  if name == "lm_head.weight":
    return model.config.tie_embeddings or model.head != "lm"
  return name.startswith("score.") and model.head == "lm"


# ----------------------------------------------------------------------------- save


def save_hf(path: str, model: Model, params: dict) -> None:
  """Writes `config.json` + `model.safetensors` loadable by transformers.

  LM models save as *ForCausalLM (GPT2LMHeadModel); value/reward models as
  *ForSequenceClassification with num_labels=1. Params may be stacked or per layer
  (`unstack_layers`, as the RL train state keeps them).
  """
  from safetensors.numpy import save_file
  params = stack_layers(params)
  os.makedirs(path, exist_ok=True)
  tensors: dict[str, np.ndarray] = {}
  fused: dict[str, dict[int, np.ndarray]] = {}
  for ppath, leaf in _leaf_paths(params):
    template, kind, n_in, is_layer = _mapping(model, ppath)
    x = np.asarray(leaf)
    slices = [(template.format(i=i), x[i]) for i in range(x.shape[0])] if is_layer \
        else [(template.format(i=None), x)]
    for name, p in slices:
      t = _from_param(p, kind, n_in)
      if kind.startswith("fused"):
        fused.setdefault(name, {})[int(kind[-1])] = t
      else:
        tensors[name] = np.ascontiguousarray(t)
  for name, parts in fused.items():
    tensors[name] = np.ascontiguousarray(np.concatenate([parts[j] for j in range(3)], -1))
  save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  hf = config_to_hf(model.config, head="lm" if model.head == "lm" else "reward",
                    dtype_name=jnp.dtype(model.param_dtype).name)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
