"""Static sampling configuration and the sampler's output / loop-state containers."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import flax.struct
import jax

from rlhf_jax.sampling import methods


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static (hashable) sampling settings.

  Attributes:
    max_new_tokens: completion length T (number of decode steps at most).
    temperature: 0 for greedy (arg-max) decoding, > 0 for sampling.
    top_k: keep the k most likely tokens (None: no top-k truncation).
    top_p: nucleus mass in (0, 1] (None or 1.0: no top-p truncation).
    eos_ids: token ids that end a sequence (the EOS token is part of the completion).
    pad_id: token written after a sequence has finished.
    num_samples: group size G; every prompt is sampled G times, rows i*G .. i*G+G-1 come
      from prompt i.
    vocab_limit: the number of real tokens (the tokenizer's vocabulary) when the model's
      vocabulary is padded beyond it (None: every row of the model's vocabulary is a
      token). Logits of ids >= vocab_limit are -inf before a token is chosen, so they are
      never sampled, and `logps` / `sampling_logps` are log-softmaxes over the real
      vocabulary only; pass the same limit to the trainer's log-probs
      (`models.token_logps(..., vocab_limit=)`) so both agree.
    compact_stages: how many times the decode loop may halve its batch (0: never). With
      k > 0 the loop runs at N rows until at most ceil(N / 2) are still generating, gathers
      those rows (their KV cache, logits and positions) into a batch half the size and
      continues there, and so on down to ceil(N / 2^k) rows; the finished rows' tokens are
      scattered back at the end. Every row's tokens and log-probs are the same as without
      compaction (each row draws from its own uniforms); decode steps after most rows have
      stopped then cost a fraction of a full-batch step. Each stage is one more copy of the
      decode step in the compiled program (compile time grows with k).
    scan_layers: decode with the decoder layers stacked under `lax.scan` (False, the
      default: the layers are taken apart and the decode step is unrolled over depth). The
      compiled program then holds one layer's decode step instead of L (compile time no
      longer grows with depth), at the cost of slicing each layer's weights at every token.
  """

  max_new_tokens: int
  temperature: float = 1.0
  top_k: Optional[int] = None
  top_p: Optional[float] = None
  eos_ids: Tuple[int, ...] = ()
  pad_id: int = 0
  num_samples: int = 1
  vocab_limit: Optional[int] = None
  compact_stages: int = 0
  scan_layers: bool = False

  def __post_init__(self):
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f"SamplingConfig.scan_layers must be True or False, got "
                       f"{self.scan_layers!r}")
    if (isinstance(self.compact_stages, bool) or not isinstance(self.compact_stages, int)
        or self.compact_stages < 0):
      raise ValueError(f"SamplingConfig.compact_stages must be an int >= 0 (0: the decode "
                       f"batch is never compacted), got {self.compact_stages!r}")
    if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
      raise ValueError(f"SamplingConfig.max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
    if not isinstance(self.num_samples, int) or self.num_samples < 1:
      raise ValueError(f"SamplingConfig.num_samples (group size) must be a positive int, "
                       f"got {self.num_samples!r}")
    if self.temperature < 0:
      raise ValueError(f"SamplingConfig.temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if isinstance(self.eos_ids, int):
      object.__setattr__(self, "eos_ids", (self.eos_ids,))
    if not isinstance(self.eos_ids, tuple):
      object.__setattr__(self, "eos_ids", tuple(self.eos_ids))
    if not all(isinstance(e, int) and e >= 0 for e in self.eos_ids):
      raise ValueError(f"SamplingConfig.eos_ids must be a tuple of non-negative ints, got {self.eos_ids!r}")
    if not isinstance(self.pad_id, int) or self.pad_id < 0:
      raise ValueError(f"SamplingConfig.pad_id must be a non-negative int, got {self.pad_id!r}")
    if self.vocab_limit is not None and (isinstance(self.vocab_limit, bool)
                                         or not isinstance(self.vocab_limit, int)
                                         or self.vocab_limit < 1):
      raise ValueError(f"SamplingConfig.vocab_limit must be None or a positive int (the "
                       f"tokenizer's vocab_size), got {self.vocab_limit!r}")
    if self.vocab_limit is not None:
      for name, ids in (("eos_ids", self.eos_ids), ("pad_id", (self.pad_id,))):
        if any(i >= self.vocab_limit for i in ids):
          raise ValueError(f"SamplingConfig.{name}={getattr(self, name)!r} is outside the "
                           f"vocabulary of vocab_limit={self.vocab_limit} tokens; use the "
                           "tokenizer's ids")
    self.method()  # validates temperature / top_k / top_p

  def method(self):
    """The token-selection method (`Greedy` or `Truncated`) this config describes."""
    return methods.make_method(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


@flax.struct.dataclass
class SampleOutput:
  """Result of `sample` (N = B * G rows, P prompt length, T = max_new_tokens).

  Attributes:
    prompt_ids: int32 [N, P] prompts repeated G times, normalised to LEFT padding, so that
      `concat([prompt_ids, completion_ids], 1)` is a valid sequence for the trainer.
    prompt_mask: bool [N, P] matching `prompt_ids`.
    completion_ids: int32 [N, T] sampled tokens; `pad_id` after a sequence finished.
    completion_mask: bool [N, T] true up to and including the first EOS.
    logps: float32 [N, T] log pi(token | prefix) at temperature 1 with no truncation (what
      the trainer computes); 0 where masked.
    sampling_logps: float32 [N, T] log q(token | prefix) under the distribution actually
      sampled from (temperature / top-k / top-p, renormalised; 0 for greedy); 0 where masked.
      With a Nash-MD mixture q is the (warped) geometric mixture of policy and reference.
    lengths: int32 [N] number of completion tokens (sum of completion_mask).
    finished: bool [N] whether the sequence produced an EOS within T tokens.
  """

  prompt_ids: jax.Array
  prompt_mask: jax.Array
  completion_ids: jax.Array
  completion_mask: jax.Array
  logps: jax.Array
  sampling_logps: jax.Array
  lengths: jax.Array
  finished: jax.Array


@flax.struct.dataclass
class DecodeState:
  """`lax.while_loop` carry of the decode loop (N rows, T = max_new_tokens, V vocab).

  Attributes:
    step: int32 [] index of the next completion token to choose.
    logits: float32 [N, V] next-token logits for position `step`.
    cache: the model's KV cache pytree (k, v: [L, N, S, Hkv, Dh]).
    positions: int32 [N] position id of the token chosen at `step`.
    tokens: int32 [N, T] chosen tokens so far.
    mask: bool [N, T] completion mask so far.
    logps: float32 [N, T]; sampling_logps: float32 [N, T].
    done: bool [N] whether the row already emitted an EOS.
    ref_logits: float32 [N, V] the reference model's next-token logits when sampling from a
      Nash-MD geometric mixture (`sample(..., mixture=...)`); None otherwise.
    ref_cache: the reference model's KV cache (mixture sampling); None otherwise.
    uniforms: float32 [N, T] the uniform each row's inverse-CDF draw uses at each step.
    kv_mask: bool [N, S] the cache slots each row attends to.
  """

  step: jax.Array
  logits: jax.Array
  cache: Any
  positions: jax.Array
  tokens: jax.Array
  mask: jax.Array
  logps: jax.Array
  sampling_logps: jax.Array
  done: jax.Array
  ref_logits: Any = None
  ref_cache: Any = None
  uniforms: Any = None
  kv_mask: Any = None
