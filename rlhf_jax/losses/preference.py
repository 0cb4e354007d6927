"""Pairwise preference losses over per-sequence log-probs (DPO family and TRL-style extras).

Every pairwise loss has the same positional interface::

  fn(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
     chosen_lengths=None, rejected_lengths=None, *, <hyper-parameters>)

`*_logps [B]` are summed (masked) completion log-probs, `*_lengths [B]` completion
token counts (used only by methods that length-normalise), and hyper-parameters are
keyword-only. Each returns `(losses [B], PairExtras)`; the caller reduces.
Notation: a = log π(y_w) − log π_ref(y_w), b = log π(y_l) − log π_ref(y_l),
h = a − b, σ the logistic function. Every loss is written with log-sigmoid
(softplus) forms so it stays finite for |βh| up to 1e3 and beyond.

Reference-free methods (SimPO, ORPO, CPL, POWER-DL) ignore the reference
arguments; for DPO-style methods the reference may be omitted (treated as 0,
"reference-free DPO").
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import check_inputs, check_range, log_sigmoid
from rlhf_jax.losses.registry import register

sg = jax.lax.stop_gradient


class PairExtras(NamedTuple):
  """Diagnostics (no gradient): implicit rewards of chosen/rejected [B], margins [B], accuracies [B]."""
  chosen_rewards: jax.Array
  rejected_rewards: jax.Array
  margins: jax.Array
  accuracies: jax.Array


def pair_extras(chosen_rewards, rejected_rewards) -> PairExtras:
  """Builds `PairExtras` from implicit rewards (stop-gradient; accuracy = margin > 0)."""
  c, r = sg(chosen_rewards), sg(rejected_rewards)
  m = c - r
  return PairExtras(c, r, m, (m > 0).astype(m.dtype))


def check_batch_vector(x, name: str) -> None:
  """Raise a ValueError naming `name` unless `x` is `[B]` (or a scalar, e.g. under vmap)."""
  if jnp.ndim(x) > 1:
    raise ValueError(f"{name} must be a [B] vector of per-sequence values (a scalar under "
                     f"vmap), got shape {jnp.shape(x)}")


def check_pair(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
               chosen_lengths=None, rejected_lengths=None, *, need_ref: bool = False,
               need_lengths: bool = False, method: str = "loss"):
  """Trace-time checks for the pairwise interface; returns float lengths (or None).

  Raises a ValueError naming the argument on a wrong rank/shape/dtype, when only
  one of the reference log-probs is given, or when a required input is missing.
  """
  check_inputs(chosen_logps=chosen_logps, rejected_logps=rejected_logps,
               ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
  check_batch_vector(chosen_logps, "chosen_logps")
  if (ref_chosen_logps is None) != (ref_rejected_logps is None):
    raise ValueError(f"{method}: pass both ref_chosen_logps and ref_rejected_logps, or neither")
  if need_ref and ref_chosen_logps is None:
    raise ValueError(f"{method} needs ref_chosen_logps and ref_rejected_logps [B] "
                     "(reference-model summed log-probs)")
  if (chosen_lengths is None) != (rejected_lengths is None):
    raise ValueError(f"{method}: pass both chosen_lengths and rejected_lengths, or neither")
  if need_lengths and chosen_lengths is None:
    raise ValueError(f"{method} length-normalises: pass chosen_lengths and rejected_lengths [B] "
                     "(completion token counts)")
  if chosen_lengths is None:
    return None, None
  lengths = []
  for name, x in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
    if jnp.shape(x) != jnp.shape(chosen_logps):
      raise ValueError(f"{name} has shape {jnp.shape(x)} but chosen_logps has shape "
                       f"{jnp.shape(chosen_logps)}; they must match")
    lengths.append(jnp.maximum(jnp.asarray(x).astype(jnp.result_type(chosen_logps)), 1.0))
  return lengths[0], lengths[1]


def logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
              chosen_lengths=None, rejected_lengths=None):
  """(a, b): policy-minus-reference log-ratios, per token if lengths are given."""
  a = chosen_logps if ref_chosen_logps is None else chosen_logps - ref_chosen_logps
  b = rejected_logps if ref_rejected_logps is None else rejected_logps - ref_rejected_logps
  if chosen_lengths is not None:
    a, b = a / chosen_lengths, b / rejected_lengths
  return a, b


def soft_bce(logits, p):
  """−p log σ(z) − (1−p) log σ(−z): soft-label binary cross-entropy on logits z."""
  return -p * log_sigmoid(logits) - (1.0 - p) * log_sigmoid(-logits)


def _check_beta(beta, method: str) -> None:
  check_range(method, "beta", beta, lambda b: b > 0, "> 0 (the implicit reward's scale)")


def _prep(args, *, need_ref=False, need_lengths=False, method="loss", normalise=False,
          beta=None):
  if beta is not None:
    _check_beta(beta, method)
  c, r, rc, rr, lc, lr = args
  lc, lr = check_pair(c, r, rc, rr, lc, lr, need_ref=need_ref, need_lengths=need_lengths,
                      method=method)
  if not normalise:
    lc = lr = None
  return logratios(c, r, rc, rr, lc, lr)


@register("dpo", family="preference")
def dpo(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
        chosen_lengths=None, rejected_lengths=None, *, beta: float = 0.1):
  """Direct Preference Optimization loss.

  ℓ = −log σ(β h),  h = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)].

  Paper: Direct Preference Optimization: Your Language Model is Secretly a Reward
  Model (Rafailov et al., 2023). Shapes: all [B] -> losses [B]. Sequence-level
  (summed log-probs, no length normalisation; lengths are ignored). With no
  reference log-probs this is reference-free DPO (π_ref ≡ 1).
  """
  a, b = _prep((chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                chosen_lengths, rejected_lengths), method="dpo", beta=beta)
  return -log_sigmoid(beta * (a - b)), pair_extras(beta * a, beta * b)


@register("cdpo", family="preference")
def cdpo(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
         chosen_lengths=None, rejected_lengths=None, *, beta: float = 0.1, eps: float = 0.0):
  """Conservative DPO (label smoothing): the DPO loss with labels flipped with probability ε.

  ℓ = −(1−ε) log σ(β h) − ε log σ(−β h).

  Paper: the cDPO note by Mitchell (2023) on Direct Preference Optimization
  (Rafailov et al., 2023); TRL's `label_smoothing`. Shapes [B] -> [B]; sequence-level.
  ε = 0 gives DPO.
  """
  a, b = _prep((chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                chosen_lengths, rejected_lengths), method="cdpo", beta=beta)
  return soft_bce(beta * (a - b), 1.0 - eps), pair_extras(beta * a, beta * b)


@register("rdpo", family="preference")
def rdpo(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
         chosen_lengths=None, rejected_lengths=None, *, beta: float = 0.1, eps: float = 0.0):
  """Robust DPO: an unbiased DPO loss under labels flipped at a known rate ε < 1/2.

  ℓ = [−(1−ε) log σ(β h) + ε log σ(−β h)] / (1 − 2ε).

  Paper: Provably Robust DPO: Aligning Language Models with Noisy Feedback
  (Chowdhury et al., 2024). Shapes [B] -> [B]; sequence-level. ε = 0 gives DPO.
  """
  check_range("rdpo", "eps (label flip rate)", eps, lambda e: 0.0 <= e < 0.5, "in [0, 0.5)")
  a, b = _prep((chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                chosen_lengths, rejected_lengths), method="rdpo", beta=beta)
  z = beta * (a - b)
  loss = (-(1.0 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1.0 - 2.0 * eps)
  return loss, pair_extras(beta * a, beta * b)


@register("ipo", family="preference")
def ipo(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
        chosen_lengths=None, rejected_lengths=None, *, beta: float = 0.1):
  """Identity Preference Optimisation: square loss pulling h towards 1/(2τ) (τ = `beta`).

  ℓ = (h̄ − 1/(2β))²,  h̄ = a/|y_w| − b/|y_l| when lengths are given (the
  length-normalised form of the method catalogue and TRL), else h̄ = h (the
  paper's sequence form).

  Paper: A General Theoretical Paradigm to Understand Learning from Human
  Preferences (Azar et al., 2023). Shapes [B] -> [B]. Token-normalised if
  lengths are passed, sequence-level otherwise.
  """
  a, b = _prep((chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                chosen_lengths, rejected_lengths), method="ipo", normalise=True, beta=beta)
  return (a - b - 0.5 / beta) ** 2, pair_extras(beta * a, beta * b)


@register("hinge", family="preference")
def hinge(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
          chosen_lengths=None, rejected_lengths=None, *, beta: float = 0.1):
  """Hinge (SLiC / RSO) loss on the reference-normalised margin.

  ℓ = max(0, 1 − β h).

  Paper: Statistical Rejection Sampling Improves Preference Optimization (Liu
  et al., 2024), the "hinge-norm" loss; pairs come from `rso_sample`.
  Shapes [B] -> [B]; sequence-level.
  """
  a, b = _prep((chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                chosen_lengths, rejected_lengths), method="hinge", beta=beta)
  return jax.nn.relu(1.0 - beta * (a - b)), pair_extras(beta * a, beta * b)


@register("simpo", family="preference")
def simpo(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
          chosen_lengths=None, rejected_lengths=None, *, beta: float = 2.0, gamma: float = 0.5):
  """SimPO: reference-free, length-normalised reward with a target margin γ.

  ℓ = −log σ(β/|y_w| · log π(y_w) − β/|y_l| · log π(y_l) − γ).

  Paper: SimPO: Simple Preference Optimization with a Reference-Free Reward
  (Meng et al., 2024). Shapes [B] -> [B]. Token-normalised when lengths are
  given (the paper's form); without lengths it is sequence-level, and with γ=0
  equals reference-free DPO. Reference arguments are ignored. `gamma` is the
  margin γ itself (the paper's γ/β ratio times β).
  """
  _check_beta(beta, "simpo")
  lc, lr = check_pair(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                      chosen_lengths, rejected_lengths, method="simpo")
  a, b = logratios(chosen_logps, rejected_logps, None, None, lc, lr)
  return -log_sigmoid(beta * (a - b) - gamma), pair_extras(beta * a, beta * b)


@register("rpo", family="preference")
def rpo(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
        chosen_lengths=None, rejected_lengths=None, *, beta: float = 0.1, eta: float = 1.0):
  """RPO: DPO plus a length-normalised NLL term on the chosen response.

  ℓ = −log σ(β h) − η · log π(y_w) / |y_w|.

  Paper: Iterative Reasoning Preference Optimization (Pang et al., 2024) — not
  the "Reward-aware Preference Optimization" nor the "Robust/Relative PO" of
  other papers (see docs/methods.md). Shapes [B] -> [B]; DPO term
  sequence-level, NLL term token-normalised (needs chosen/rejected_lengths
  unless η = 0). η = 0 gives DPO.
  """
  args = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
          chosen_lengths, rejected_lengths)
  _check_beta(beta, "rpo")
  no_nll = isinstance(eta, (int, float)) and eta == 0
  lc, _ = check_pair(*args, need_lengths=not no_nll, method="rpo")
  a, b = logratios(*args[:4])
  loss = -log_sigmoid(beta * (a - b))
  if not no_nll:
    loss = loss - eta * chosen_logps / lc
  return loss, pair_extras(beta * a, beta * b)


@register("osp", family="preference")
def osp(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
        chosen_lengths=None, rejected_lengths=None, *, preference_strength,
        beta: float = 0.1):
  """OSP soft-preference cross-entropy with a (self-judged) preference strength p.

  ℓ = −p log σ(β h) − (1 − p) log σ(−β h),  p ∈ [0, 1] per pair (no gradient).

  Paper: Online Self-Preferring Language Models (Zhai et al., 2024). [unverified:
  the abstract names a "soft-preference cross-entropy"; this is its natural
  form, p = 1 gives DPO and constant p = 1−ε gives cDPO.] Shapes: logps [B],
  preference_strength [B] -> [B]; sequence-level.
  """
  a, b = _prep((chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                chosen_lengths, rejected_lengths), method="osp", beta=beta)
  check_inputs(chosen_logps=chosen_logps, preference_strength=preference_strength)
  return soft_bce(beta * (a - b), sg(preference_strength)), pair_extras(beta * a, beta * b)


@register("nca", family="preference")
def nca(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
        chosen_lengths=None, rejected_lengths=None, *, beta: float = 0.1):
  """NCA (pairwise): absolute-likelihood noise-contrastive alignment.

  ℓ = −log σ(β a) − ½ log σ(−β a) − ½ log σ(−β b)   (TRL `nca_pair`).

  Paper: Noise Contrastive Alignment of Language Models with Explicit Rewards
  (Chen et al., 2024). Shapes [B] -> [B]; sequence-level.
  """
  a, b = _prep((chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                chosen_lengths, rejected_lengths), method="nca", beta=beta)
  ra, rb = beta * a, beta * b
  loss = -log_sigmoid(ra) - 0.5 * log_sigmoid(-ra) - 0.5 * log_sigmoid(-rb)
  return loss, pair_extras(ra, rb)


@register("bco_pair", family="preference")
def bco_pair(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
             chosen_lengths=None, rejected_lengths=None, *, beta: float = 0.1,
             delta=0.0):
  """BCO (pairwise): binary classification of chosen vs rejected implicit rewards around δ.

  ℓ = −log σ(β a − δ) − log σ(−(β b − δ))   (TRL `bco_pair`).

  δ is the reward shift: TRL uses a running mean of the batch means of
  {β a, β b}; pass it in (scalar or [B]; no gradient). Paper: Binary Classifier
  Optimization for Large Language Model Alignment (Jung et al., 2024).
  Shapes [B] -> [B]; sequence-level.
  """
  a, b = _prep((chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                chosen_lengths, rejected_lengths), method="bco_pair", beta=beta)
  d = sg(jnp.asarray(delta, a.dtype))
  if d.ndim > 1 or (d.ndim == 1 and d.shape != a.shape):
    raise ValueError(f"bco_pair: delta must be a scalar or [B]={a.shape}, got {d.shape}")
  ra, rb = beta * a, beta * b
  return -log_sigmoid(ra - d) - log_sigmoid(-(rb - d)), pair_extras(ra, rb)


@register("sppo_hard", family="preference")
def sppo_hard(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
              chosen_lengths=None, rejected_lengths=None, *, beta: float = 0.1):
  """SPPO with hard (0/1) win probabilities: square-loss regression of each log-ratio.

  ℓ = (a − 1/(2β))² + (b + 1/(2β))²   (TRL `sppo_hard`; P(y_w ≻ π)=1, P(y_l ≻ π)=0).

  Paper: Self-Play Preference Optimization for Language Model Alignment (Wu et
  al., 2024). Shapes [B] -> [B]; sequence-level. Needs the reference log-probs.
  """
  a, b = _prep((chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                chosen_lengths, rejected_lengths), need_ref=True, method="sppo_hard", beta=beta)
  return (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2, pair_extras(beta * a, beta * b)


@register("apo_zero", family="preference")
def apo_zero(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
             chosen_lengths=None, rejected_lengths=None, *, beta: float = 0.1):
  """APO-zero: raise the chosen and lower the rejected likelihood independently.

  ℓ = (1 − σ(β a)) + σ(β b) = σ(−β a) + σ(β b)   (TRL `apo_zero`).

  Paper: Anchored Preference Optimization and Contrastive Revisions (D'Oosterlinck
  et al., 2024) — "Anchored" PO, not "Asymmetric" PO (see docs/methods.md).
  Use when chosen outputs are better than the model's. Shapes [B] -> [B]; sequence-level.
  """
  a, b = _prep((chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                chosen_lengths, rejected_lengths), need_ref=True, method="apo_zero", beta=beta)
  return jax.nn.sigmoid(-beta * a) + jax.nn.sigmoid(beta * b), pair_extras(beta * a, beta * b)


@register("apo_down", family="preference")
def apo_down(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
             chosen_lengths=None, rejected_lengths=None, *, beta: float = 0.1):
  """APO-down: lower both likelihoods, the rejected more (chosen worse than the model).

  ℓ = σ(β a) + (1 − σ(β (a − b))) = σ(β a) + σ(−β h)   (TRL `apo_down`).

  Paper: Anchored Preference Optimization and Contrastive Revisions (D'Oosterlinck
  et al., 2024). Shapes [B] -> [B]; sequence-level.
  """
  a, b = _prep((chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                chosen_lengths, rejected_lengths), need_ref=True, method="apo_down", beta=beta)
  return jax.nn.sigmoid(beta * a) + jax.nn.sigmoid(-beta * (a - b)), pair_extras(beta * a, beta * b)


@register("discopop", family="preference")
def discopop(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
             chosen_lengths=None, rejected_lengths=None, *, beta: float = 0.1,
             tau: float = 0.05):
  """DiscoPOP: log-ratio-modulated blend of the logistic (DPO) and exponential losses.

  z = β h, m = σ(z/τ):  ℓ = (1 − m)·(−log σ(z)) + m·exp(−z)   (TRL `discopop`).
  The second term is computed as exp(−z + log σ(z/τ)) so it stays finite for
  very negative z when τ < 1.

  Paper: Discovering Preference Optimization Algorithms with and for Large
  Language Models (Chris Lu et al., 2024). Shapes [B] -> [B]; sequence-level.
  """
  a, b = _prep((chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                chosen_lengths, rejected_lengths), method="discopop", beta=beta)
  z = beta * (a - b)
  loss = jax.nn.sigmoid(-z / tau) * -log_sigmoid(z) + jnp.exp(-z + log_sigmoid(z / tau))
  return loss, pair_extras(beta * a, beta * b)


@register("exo", family="preference")
def exo(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
        chosen_lengths=None, rejected_lengths=None, *, beta: float = 0.1, eps: float = 1e-3):
  """EXO (pairwise): reverse KL from the model's pair distribution to smoothed labels.

  p = σ(β h):  ℓ = p (log p − log(1−ε)) + (1−p)(log(1−p) − log ε)   (TRL `exo_pair`),
  i.e. KL([p, 1−p] ‖ [1−ε, ε]); ε > 0 is required (TRL default 1e-3).

  Paper: Towards Efficient Exact Optimization of Language Model Alignment (Ji
  et al., 2024). Shapes [B] -> [B]; sequence-level.
  """
  if not 0.0 < eps < 1.0:
    raise ValueError(f"exo: eps (label smoothing) must be in (0, 1), got {eps}")
  a, b = _prep((chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                chosen_lengths, rejected_lengths), method="exo", beta=beta)
  z = beta * (a - b)
  loss = (jax.nn.sigmoid(z) * (log_sigmoid(z) - jnp.log1p(-eps))
          + jax.nn.sigmoid(-z) * (log_sigmoid(-z) - jnp.log(eps)))
  return loss, pair_extras(beta * a, beta * b)


@register("aot", family="preference")
def aot(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
        chosen_lengths=None, rejected_lengths=None, *, beta: float = 0.1, eps: float = 0.0,
        paired: bool = True):
  """AOT: distributional alignment via optimal transport (sorted quantiles over the batch).

  paired=True (TRL `aot_pair`): Δ = sort_B(a) − sort_B(b);
  paired=False (TRL `aot`):     Δ = sort_B(log π(y_w) − log π(y_l)) − sort_B(ref margins);
  ℓ = −(1−ε) log σ(β Δ) − ε log σ(−β Δ), per quantile.

  Paper: Distributional Preference Alignment of LLMs via Optimal Transport
  (Melnyk et al., 2024). Shapes [B] -> [B] (entry i is the i-th quantile, NOT
  example i: the loss couples the batch; vmap over an outer axis only).
  Sequence-level.
  """
  args = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
          chosen_lengths, rejected_lengths)
  _check_beta(beta, "aot")
  check_pair(*args, need_ref=True, method="aot")
  a, b = logratios(*args[:4])
  if paired:
    delta = jnp.sort(a) - jnp.sort(b)
  else:
    delta = (jnp.sort(chosen_logps - rejected_logps)
             - jnp.sort(ref_chosen_logps - ref_rejected_logps))
  return soft_bce(beta * delta, 1.0 - eps), pair_extras(beta * a, beta * b)
