"""Low-rank adapters (LoRA) on the attention and MLP projections, as a separate pytree.

  lora_params = lora.init(rng, model, params, rank=8, alpha=16, targets=("q_proj", "v_proj"))
  merged = lora.apply_params(params, lora_params, alpha=16)     # pure; use inside jit
  logits = model.apply(merged, ids, mask)                      # the policy
  ref_logits = model.apply(params, ids, mask)                  # the reference: adapters off

A target kernel W (viewed as a matrix [in, out]) becomes W + (alpha / r) * A @ B with
A [in, r] and B [r, out]. B starts at zero, so fresh adapters leave the model unchanged;
A starts uniform in +-1/sqrt(in) (PEFT's default Kaiming-uniform bound).

`lora_params` mirrors the parameter tree: {"layers": {"attn": {"q_kernel": {"a": [L, in, r],
"b": [L, r, out]}}, "mlp": {...}}} (stacked over layers). Train only the adapters by
differentiating with respect to `lora_params` (the base params are then constants); where
one tree holds both, `trainable_mask` / `freeze_base` train only the leaves under a "lora"
key. See Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models"
(https://arxiv.org/abs/2106.09685).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Kernel name -> (layer module, number of leading input dims, PEFT / transformers module).
TARGETS = {
    "q_kernel": ("attn", 1, "self_attn.q_proj"),
    "k_kernel": ("attn", 1, "self_attn.k_proj"),
    "v_kernel": ("attn", 1, "self_attn.v_proj"),
    "o_kernel": ("attn", 2, "self_attn.o_proj"),
    "gate_kernel": ("mlp", 1, "mlp.gate_proj"),
    "up_kernel": ("mlp", 1, "mlp.up_proj"),
    "down_kernel": ("mlp", 1, "mlp.down_proj"),
}
# transformers module names accepted as targets.
HF_NAMES = {info[2].split(".")[-1]: name for name, info in TARGETS.items()}


def _layers(params):
  layers = params["layers"]
  return layers[0] if isinstance(layers, (tuple, list)) else layers


def valid_targets(model, params=None) -> tuple[str, ...]:
  """Kernel names this model can adapt (e.g. no gate_kernel for GPT-2's GELU MLP)."""
  if params is None:
    params = jax.eval_shape(model.init, jax.random.key(0))
  layer = _layers(params)
  return tuple(n for n, (mod, _, _) in TARGETS.items() if n in layer.get(mod, {}))


def resolve_targets(model, targets: Iterable[str], params=None) -> tuple[str, ...]:
  """Target names ("q_kernel" or "q_proj" style) -> kernel names, in `TARGETS` order.

  Raises ValueError naming every target that matches no parameter, with the valid names.
  """
  if isinstance(targets, str):
    targets = (targets,)
  targets = tuple(targets)
  valid = valid_targets(model, params)
  names, bad = set(), []
  for t in targets:
    name = HF_NAMES.get(t, t)
    (names.add(name) if name in valid else bad.append(t))
  if bad or not targets:
    hf = [TARGETS[n][2].split(".")[-1] for n in valid]
    raise ValueError(
        f"LoRA targets {bad or list(targets)} match no parameter of this "
        f"{model.config.model_type} model; valid targets: {', '.join(valid)} "
        f"(or {', '.join(hf)}).")
  return tuple(n for n in TARGETS if n in names)


def _check_rank_alpha(rank, alpha):
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank <= 0:
    raise ValueError(f"LoRA rank must be a positive int, got {rank!r}.")
  if not isinstance(alpha, (int, float, np.number)) or not alpha > 0:
    raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}.")


def init(rng: jax.Array, model, params, rank: int, alpha: float,
         targets: Sequence[str] = ("q_proj", "v_proj"), *, dtype=jnp.float32) -> dict:
  """Fresh adapters for `targets` in every layer: A ~ U(+-1/sqrt(in)), B = 0.

  Args:
    rng: PRNG key. model, params: the base model and its params (stacked or per layer;
      only shapes are read; None: `model.init` shapes).
    rank: r. alpha: scale numerator (the update is alpha / r * A @ B); checked here,
      passed again to `apply_params`.
    targets: kernel names ("q_kernel", ...) or transformers module names ("q_proj", ...).
  Returns:
    {"layers": {module: {kernel: {"a": [L, in, r], "b": [L, r, out]}}}} in `dtype`.
  """
  _check_rank_alpha(rank, alpha)
  if params is None:
    params = jax.eval_shape(model.init, jax.random.key(0))
  names = resolve_targets(model, targets, params)
  layer = _layers(params)
  n_layers = model.config.num_layers
  out: dict[str, dict] = {}
  for i, name in enumerate(names):
    mod, n_in, _ = TARGETS[name]
    shape = layer[mod][name].shape
    if not isinstance(params["layers"], (tuple, list)):
      shape = shape[1:]
    d_in, d_out = math.prod(shape[:n_in]), math.prod(shape[n_in:])
    bound = 1.0 / math.sqrt(d_in)
    a = jax.random.uniform(jax.random.fold_in(rng, i), (n_layers, d_in, rank), jnp.float32,
                           -bound, bound)
    out.setdefault(mod, {})[name] = {"a": a.astype(dtype),
                                     "b": jnp.zeros((n_layers, rank, d_out), dtype)}
  return {"layers": out}


def rank_of(lora_params) -> int:
  """r of a LoRA tree (every adapter has the same rank)."""
  ranks = {ab["a"].shape[-1] for mod in lora_params["layers"].values() for ab in mod.values()}
  if len(ranks) != 1:
    raise ValueError(f"LoRA adapters have different ranks {sorted(ranks)}.")
  return ranks.pop()


def delta(a, b, alpha: float, rank: int):
  """alpha / r * A @ B over leading (layer) axes: [..., in, r] x [..., r, out]."""
  return jnp.einsum("...ir,...ro->...io", a, b) * jnp.asarray(alpha / rank, a.dtype)


def _rank(lora_params, alpha, rank: Optional[int], what: str) -> int:
  r = rank_of(lora_params)
  if rank is not None and rank != r:
    raise ValueError(f"{what}: rank={rank} but the adapters have rank {r}.")
  if not isinstance(alpha, jax.core.Tracer):
    _check_rank_alpha(r, alpha)
  return r


def _over_targets(params, lora_params, what: str, edit):
  """`params` (stacked or per layer) with `edit(module_dict, kernel_name, a, b)` applied to
  every adapted kernel of every layer (a, b: that layer's adapter, or the stacked ones)."""
  def one_layer(layer, i=None):
    layer = dict(layer)
    for mod, kernels in lora_params["layers"].items():
      sub = dict(layer[mod])
      for name, ab in kernels.items():
        if name not in sub:
          raise ValueError(f"{what}: the adapters target layers/{mod}/{name}, which the "
                           "params do not have.")
        edit(sub, name, *((ab["a"], ab["b"]) if i is None else (ab["a"][i], ab["b"][i])))
      layer[mod] = sub
    return layer

  if isinstance(params["layers"], (tuple, list)):
    layers = tuple(one_layer(p, i) for i, p in enumerate(params["layers"]))
  else:
    layers = one_layer(params["layers"])
  return {**params, "layers": layers}


def apply_params(params, lora_params, alpha: float, rank: Optional[int] = None):
  """Base params with the adapters merged in: W + alpha / r * A @ B for every target.

  Pure and jit-friendly; `params` may be stacked or per layer (the result keeps its
  layout and dtypes). Gradients flow to both `params` and `lora_params`.
  """
  r = _rank(lora_params, alpha, rank, "apply_params")

  def merge(sub, name, a, b):
    w = sub[name]
    d = delta(a.astype(jnp.promote_types(a.dtype, w.dtype)), b, alpha, r)
    sub[name] = (w + d.reshape(w.shape).astype(w.dtype)).astype(w.dtype)
  return _over_targets(params, lora_params, "apply_params", merge)


def attach(params, lora_params, alpha: float, rank: Optional[int] = None):
  """Base params with the adapters ATTACHED, not merged: the decoder then computes
  x @ W + (x @ A) @ (alpha / r · B) for every target (the same function as
  `apply_params`).

  No merged copy of a target kernel is made, and the gradient with respect to the adapters
  flows through the two thin matmuls only (no [in, out] kernel gradient), which is what a
  training pass wants; a decoder reads merged weights faster (`apply_params`). Each
  target's layer module gets "<kernel>_lora_a" [.., in, r] and "<kernel>_lora_b"
  [.., r, out] (scaled); `params` may be stacked or per layer.
  """
  r = _rank(lora_params, alpha, rank, "attach")

  def add(sub, name, a, b):
    sub[name + "_lora_a"] = a
    sub[name + "_lora_b"] = b * jnp.asarray(alpha / r, b.dtype)
  return _over_targets(params, lora_params, "attach", add)


# ----------------------------------------------------------------------------- training


def _under_lora(path) -> bool:
  return any(getattr(k, "key", None) == "lora" for k in path)


def trainable_mask(tree):
  """Bool pytree like `tree`: True for leaves under a "lora" key (the adapters)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: _under_lora(p), tree)


def freeze_base(tx):
  """`tx` on the leaves under a "lora" key; zero updates (and no state) elsewhere.

  For a train state whose params are e.g. {"base": params, "lora": lora_params}.
  (`optax.masked` would pass the frozen leaves' raw gradients through.)
  """
  import optax  # training dependency only
  labels = lambda tree: jax.tree_util.tree_map_with_path(  # noqa: E731
      lambda p, _: "lora" if _under_lora(p) else "frozen", tree)
  return optax.multi_transform({"lora": tx, "frozen": optax.set_to_zero()}, labels)


# ----------------------------------------------------------------------------- export


def export_merged(path: str, model, params, lora_params, alpha: float,
                  rank: Optional[int] = None) -> None:
  """Writes the merged model as a transformers checkpoint (`save_hf`)."""
  from rlhf_jax.models.hf_io import save_hf
  merged = jax.jit(apply_params, static_argnums=(2, 3))(params, lora_params, float(alpha),
                                                        rank)
  save_hf(path, model, jax.device_get(merged))


def peft_state_dict(model, lora_params) -> dict[str, np.ndarray]:
  """PEFT tensor names -> arrays: lora_A [r, in] and lora_B [out, r] per layer and target."""
  if model.config.model_type == "gpt2":
    raise ValueError("export_peft: GPT-2 fuses q/k/v into one c_attn module, which "
                     "separate q/k/v adapters do not map to; use export_merged.")
  tensors = {}
  for mod, kernels in lora_params["layers"].items():
    for name, ab in kernels.items():
      a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
      for i in range(a.shape[0]):
        prefix = f"base_model.model.model.layers.{i}.{TARGETS[name][2]}"
        tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
        tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
  return tensors


def peft_config(model, lora_params, alpha: float, *,
                base_model_name_or_path: Optional[str] = None) -> dict[str, Any]:
  """PEFT's `adapter_config.json` for these adapters (LoRA, causal LM, no dropout)."""
  modules = sorted(TARGETS[n][2].split(".")[-1]
                   for kernels in lora_params["layers"].values() for n in kernels)
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank_of(lora_params),
      "lora_alpha": alpha, "target_modules": modules, "lora_dropout": 0.0,
      "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
      "init_lora_weights": True, "use_rslora": False, "use_dora": False,
      "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {},
      "alpha_pattern": {}, "base_model_name_or_path": base_model_name_or_path,
      "revision": None,
  }


def export_peft(path: str, model, lora_params, alpha: float, *,
                base_model_name_or_path: Optional[str] = None) -> None:
  """Writes the adapters alone in PEFT's layout: `adapter_model.safetensors` +
  `adapter_config.json` (load with `peft.PeftModel.from_pretrained(base, path)`).

  LM-head llama/qwen2/gemma models only (GPT-2's fused c_attn has no q/k/v modules).
  """
  from safetensors.numpy import save_file
  if model.head != "lm":
    raise ValueError(f"export_peft writes causal-LM adapters; this model has head="
                     f"{model.head!r} (use export_merged).")
  tensors = peft_state_dict(model, lora_params)
  os.makedirs(path, exist_ok=True)
  save_file(tensors, os.path.join(path, "adapter_model.safetensors"),
            metadata={"format": "pt"})
  cfg = peft_config(model, lora_params, alpha, base_model_name_or_path=base_model_name_or_path)
  with open(os.path.join(path, "adapter_config.json"), "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
