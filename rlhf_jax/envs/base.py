"""The environment interface for multi-turn rollouts, its static spec and token helpers.

An environment is a small hashable object with two pure functions over a
`flax.struct.dataclass` state whose every leaf leads with the batch axis (gymnax style):

    state, obs_ids, obs_mask = env.reset(rng, prompt_batch)        # one row per prompt
    state, obs_ids, obs_mask, reward, done = env.step(state, action_ids, action_mask)

`reset` sees the (left-padded) prompt batch, one row per prompt, and returns a first
observation `[B, O0]` (O0 may be 0) that is appended to the prompt; the rollout then
repeats the state for the G samples of each prompt. `step` sees each row's model tokens
of the turn (`action_ids`, `action_mask` [N, turn_tokens], real tokens first) and returns
the observation `[N, obs_tokens]` with its mask, the turn's reward [N] float32 and
whether the episode ended [N] bool. Rows already done are stepped too (with an empty
action); the rollout ignores what they return.

`EnvSpec` holds the static settings the rollout reads: `max_turns`, the per-turn token
budget `turn_tokens`, the observation width `obs_tokens` and the stop sequences that
end a turn (token ids; `stop_ids` encodes stop strings and refuses strings that do not
encode to one fixed id sequence).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Protocol, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np


class EnvSpecError(ValueError):
  """An environment setting that cannot work (e.g. `max_turns=0`, a bad observation shape)."""


class StopStringError(EnvSpecError):
  """A stop string the tokenizer cannot encode to one fixed token-id sequence."""


class ContextLengthError(EnvSpecError):
  """The prompt plus every turn's tokens and observations exceed the model's context."""


class HostToolError(RuntimeError):
  """A host tool raised or timed out under `on_error="raise"`."""


class ObservationTruncatedWarning(UserWarning):
  """A host observation had more tokens than `obs_tokens`; its first tokens were kept."""


@dataclasses.dataclass(frozen=True)
class EnvSpec:
  """Static multi-turn settings (hashable: part of the jitted program's shape).

  Attributes:
    max_turns: K, the most model turns per episode (>= 1).
    turn_tokens: the most tokens the model emits in one turn (>= 1).
    obs_tokens: O, the width of one observation (>= 1; the rollout reserves O slots
      after every turn but the last).
    stop_sequences: token-id sequences that end a turn when the model emits one (it is
      part of the turn); the sampling config's EOS ids end a turn too.
  """
  max_turns: int
  turn_tokens: int
  obs_tokens: int
  stop_sequences: Tuple[Tuple[int, ...], ...] = ()

  def __post_init__(self):
    for name in ("max_turns", "turn_tokens", "obs_tokens"):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise EnvSpecError(f"EnvSpec.{name} must be a positive int, got {v!r}"
                           + ("; an episode needs at least one turn" if name == "max_turns"
                              else ""))
    seqs = tuple(tuple(int(t) for t in s) for s in self.stop_sequences)
    for s in seqs:
      if not s or any(t < 0 for t in s):
        raise EnvSpecError(f"EnvSpec.stop_sequences entries must be non-empty sequences of "
                           f"non-negative token ids, got {s!r}")
    object.__setattr__(self, "stop_sequences", seqs)

  @property
  def span(self) -> int:
    """Cache slots one turn reserves: its tokens, then its observation."""
    return self.turn_tokens + self.obs_tokens

  @property
  def completion_tokens(self) -> int:
    """T, the most completion tokens of an episode: K turns and K - 1 observations."""
    return self.max_turns * self.turn_tokens + (self.max_turns - 1) * self.obs_tokens

  def stop_table(self) -> Tuple[np.ndarray, int]:
    """(table [M, L] int32 right-aligned, -1 on the left as a wildcard; L). M may be 0."""
    width = max([len(s) for s in self.stop_sequences] + [1])
    table = np.full((len(self.stop_sequences), width), -1, np.int32)
    for i, s in enumerate(self.stop_sequences):
      table[i, width - len(s):] = s
    return table, width


def stop_ids(tokenizer, strings: Sequence[str]) -> Tuple[Tuple[int, ...], ...]:
  """Token ids of stop strings; raises `StopStringError` unless each has one fixed encoding.

  A string must encode to a non-empty id sequence, and to the same sequence when it
  follows or precedes other text (checked with a few neighbours), so that matching the
  ids in the sampled tokens finds the string. Pass ids to `EnvSpec` directly otherwise.
  """
  out = []
  for s in strings:
    if not isinstance(s, str) or not s:
      raise StopStringError(f"stop string must be a non-empty str, got {s!r}")
    try:
      ids = list(tokenizer.encode(s))
    except Exception as e:  # pylint: disable=broad-except
      raise StopStringError(f"stop string {s!r} cannot be encoded by {type(tokenizer).__name__}: "
                            f"{e}") from e
    if not ids:
      raise StopStringError(f"stop string {s!r} encodes to no tokens")
    for ctx in ("1", "a", " "):
      try:
        before, after = list(tokenizer.encode(ctx + s)), list(tokenizer.encode(s + ctx))
      except Exception:  # pylint: disable=broad-except
        continue  # the neighbour itself is not encodable: nothing to compare
      if before[-len(ids):] != ids or after[:len(ids)] != ids:
        raise StopStringError(
            f"stop string {s!r} has no fixed token sequence: alone it is {ids}, after {ctx!r} "
            f"it ends {before[-len(ids):]}, before {ctx!r} it starts {after[:len(ids)]}; pass "
            "the token ids the model emits to EnvSpec(stop_sequences=...) instead")
    out.append(tuple(int(i) for i in ids))
  return tuple(out)


class Env(Protocol):
  """What `rlhf_jax.train.multiturn.rollout_multiturn` needs from an environment."""

  def reset(self, rng: jax.Array, prompt_batch: Mapping[str, jax.Array]) -> Tuple[Any, jax.Array,
                                                                                  jax.Array]:
    ...

  def step(self, state: Any, action_ids: jax.Array, action_mask: jax.Array
           ) -> Tuple[Any, jax.Array, jax.Array, jax.Array, jax.Array]:
    ...


# ----------------------------------------------------------------------------- token helpers


def char_ids(tokenizer, text: str, what: str) -> np.ndarray:
  """Encodes `text` with `tokenizer` (int32 [n]); raises EnvSpecError naming `what`."""
  try:
    ids = tokenizer.encode(text)
  except Exception as e:  # pylint: disable=broad-except
    raise EnvSpecError(f"{what}: the tokenizer cannot encode {text!r}: {e}") from e
  return np.asarray(ids, np.int32)


def digit_ids(tokenizer, what: str) -> np.ndarray:
  """The ids of "0".."9" (int32 [10]); each digit must be a single token."""
  out = []
  for d in "0123456789":
    ids = char_ids(tokenizer, d, what)
    if ids.shape != (1,):
      raise EnvSpecError(f"{what} needs every digit to be one token; {d!r} encodes to "
                         f"{ids.tolist()}")
    out.append(int(ids[0]))
  return np.asarray(out, np.int32)


def pad_rows(seqs: Sequence[Sequence[int]], width: int, pad_id: int) -> Tuple[np.ndarray,
                                                                              np.ndarray]:
  """Right-pads int sequences to (ids int32 [M, width], mask bool [M, width])."""
  ids = np.full((len(seqs), width), pad_id, np.int32)
  mask = np.zeros((len(seqs), width), bool)
  for i, s in enumerate(seqs):
    if len(s) > width:
      raise EnvSpecError(f"sequence {list(s)} has {len(s)} tokens > width {width}")
    ids[i, :len(s)] = s
    mask[i, :len(s)] = True
  return ids, mask


def digit_values(ids: jax.Array, digits: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """(value of each digit token, whether it is a digit), both shaped like `ids`."""
  hit = ids[..., None] == digits
  return jnp.argmax(hit, axis=-1).astype(jnp.int32), jnp.any(hit, axis=-1)


def number_in_span(ids: jax.Array, digits: jax.Array, start: jax.Array, end: jax.Array,
                   max_digits: int) -> Tuple[jax.Array, jax.Array]:
  """Reads the decimal number that fills `ids[r, start_r:end_r]` exactly.

  Returns (value int32 [N], ok bool [N]); ok needs 1..max_digits tokens, all digits.
  ids [N, L]; start, end [N] int.
  """
  pos = jnp.arange(ids.shape[1])[None, :]
  inside = (pos >= start[:, None]) & (pos < end[:, None])
  val, is_digit = digit_values(ids, digits)
  n = end - start
  ok = (n >= 1) & (n <= max_digits) & jnp.all(~inside | is_digit, axis=1)
  power = jnp.clip(end[:, None] - 1 - pos, 0, max_digits)
  weights = jnp.where(inside, 10 ** power, 0)
  return jnp.sum(weights * val, axis=1).astype(jnp.int32), ok


def number_tokens(value: jax.Array, digits: jax.Array, minus_id: int, width: int,
                  pad_id: int) -> Tuple[jax.Array, jax.Array]:
  """Decimal tokens of int32 `value` [N], left-aligned in [N, width] (a leading minus id
  for negatives). Returns (ids int32 [N, width], mask bool [N, width])."""
  neg = value < 0
  mag = jnp.abs(value)
  n_dig = 1 + sum((mag >= 10 ** k).astype(jnp.int32) for k in range(1, 10))
  total = n_dig + neg.astype(jnp.int32)
  j = jnp.arange(width)[None, :]
  k = (total[:, None] - 1 - j)  # power of ten of the digit at slot j
  dig = (mag[:, None] // (10 ** jnp.clip(k, 0, 9))) % 10
  ids = jnp.where(neg[:, None] & (j == 0), minus_id, digits[dig])
  mask = j < total[:, None]
  return jnp.where(mask, ids, pad_id).astype(jnp.int32), mask


def text_tokens(tokenizer, texts: Sequence[str], width: int, what: str) -> Tuple[np.ndarray,
                                                                                np.ndarray]:
  """Fixed observation texts as (ids [M, width], mask [M, width]) for a JAX env's table."""
  seqs = [char_ids(tokenizer, t, what).tolist() for t in texts]
  longest = max(len(s) for s in seqs)
  if longest > width:
    raise EnvSpecError(f"{what}: observation {texts[[len(s) for s in seqs].index(longest)]!r} "
                       f"has {longest} tokens > obs_tokens={width}; raise obs_tokens")
  return pad_rows(seqs, width, int(getattr(tokenizer, "pad_id", 0)))


def ends_with(ids: jax.Array, lengths: jax.Array, pattern: np.ndarray) -> jax.Array:
  """Whether row r's first `lengths[r]` tokens of `ids` [N, L] end with `pattern` [m]."""
  m = len(pattern)
  pos = lengths[:, None] - m + jnp.arange(m)[None, :]
  got = jnp.take_along_axis(ids, jnp.clip(pos, 0, ids.shape[1] - 1), axis=1)
  return (lengths >= m) & jnp.all(got == jnp.asarray(pattern)[None, :], axis=1)


def last_match_start(ids: jax.Array, limit: jax.Array, pattern: np.ndarray) -> jax.Array:
  """Start of the last occurrence of `pattern` lying wholly before `limit[r]`; -1 if none."""
  n, length = ids.shape
  m = len(pattern)
  if m > length:
    return jnp.full((n,), -1, jnp.int32)
  starts = jnp.arange(length - m + 1)
  windows = ids[:, starts[:, None] + jnp.arange(m)[None, :]]  # [N, S, m]
  hit = jnp.all(windows == jnp.asarray(pattern), axis=-1) & (starts[None, :] + m <= limit[:, None])
  return jnp.max(jnp.where(hit, starts[None, :], -1), axis=1).astype(jnp.int32)


def repeat_rows(tree, group_size: int, what: str = "environment state"):
  """Repeats every leaf of `tree` `group_size` times along axis 0 (rows i*G .. i*G+G-1)."""
  def rep(x):
    if jnp.ndim(x) == 0:
      raise EnvSpecError(f"every {what} leaf needs a leading batch axis; got a scalar")
    return jnp.repeat(x, group_size, axis=0)
  return jax.tree.map(rep, tree)


def select_rows(keep: jax.Array, new, old):
  """Per-row choice between two pytrees with a leading batch axis: new where `keep`."""
  def sel(a, b):
    k = keep.reshape(keep.shape + (1,) * (jnp.ndim(a) - 1))
    return jnp.where(k, a, b)
  return jax.tree.map(sel, new, old)
