"""A registry of reward builders, each declaring what the fused online RL step must provide.

`config.rewards` is a list whose entries are a reward name or a dict
`{"name": ..., "weight": w, "label": metric_name, ...builder keys}`:

    rewards = ["exact_match",
               {"name": "format", "weight": 0.2},
               {"name": "python", "fn": "my_pkg.rewards:score", "weight": 0.5}]
    built = build_rewards(rewards, RewardContext(tokenizer, max_new_tokens=256,
                                                 records=records))

Every `Reward` in `built` carries the reward function (unweighted,
`fn(prompt_ids [N, P], completion_ids [N, T], completion_mask [N, T], batch_extras)
-> [N] float32`, traceable under `jax.jit`), its weight, a metric name unique in the
list, and the builder's `RewardDecl`:

* `needs`: inputs the step must provide. "answer_ids" — `batch_extras["answer_ids"]`
  and `["answer_mask"]`, the reference answer tokens; "records" —
  `batch_extras["record_index"]` [N] int32 indexing `RewardContext.records`, the host
  table of dataset records (dicts with "prompt", "answer" and any other field).
* `host`: the reward runs in Python on the host through `jax.pure_callback`: one
  host round-trip per step, plus the Python time per row. In-jit rewards cost nothing
  beyond their arithmetic.
* `verifier`: a correctness check; `text_scorer(spec, ctx)` gives its
  `(record, completion_text) -> score` form for held-out accuracy.

New builders register with `@register(name, needs=..., host=..., verifier=...)` on
`builder(ctx: RewardContext, *, key=default, ...) -> RewardFn`; the builder's keyword
arguments are the keys its config entry accepts (a key without a default is
required). A host reward can be written over decoded text with `host_reward`. A
verifier gives its text form with `@register_text_scorer(name)` on
`scorer_builder(ctx, *, same keys) -> (record, completion_text) -> float`.

The built-in rewards are in `rlhf_jax.rewards.builtin` and described in
`docs/rewards.md`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.rewards.base import RewardFn, check_reward_inputs, get_extra
from rlhf_jax.rewards.verifiers import truncate_at_eos

NEEDS = ("answer_ids", "records")
RESERVED_KEYS = ("name", "weight", "label")
TextScorer = Callable[[Mapping[str, Any], str], float]


class RewardError(RuntimeError):
  """A reward failed while scoring a batch on the host; the message names the reward and row."""


@dataclasses.dataclass(frozen=True)
class RewardDecl:
  """What a registered reward needs and how it runs (see the module docstring)."""
  name: str
  needs: tuple[str, ...] = ()
  host: bool = False
  verifier: bool = False


@dataclasses.dataclass
class RewardContext:
  """What builders may use: the run's tokenizer, the decode budget and the host record table.

  `records[i]` is the dataset record whose prompt has `batch_extras["record_index"] == i`.
  """
  tokenizer: Any
  max_new_tokens: int
  records: Optional[Sequence[Mapping[str, Any]]] = None


class Reward(NamedTuple):
  """One built entry of `config.rewards`; `fn` is unweighted, the step multiplies by `weight`."""
  name: str
  fn: RewardFn
  weight: float
  decl: RewardDecl


class _Entry(NamedTuple):
  builder: Callable[..., RewardFn]
  decl: RewardDecl
  keys: Optional[tuple[str, ...]]  # None: the builder takes any key (**kwargs)
  required: tuple[str, ...]


_REGISTRY: Dict[str, _Entry] = {}
_TEXT_SCORERS: Dict[str, Callable[..., TextScorer]] = {}


def _signature_keys(builder: Callable) -> tuple[Optional[tuple[str, ...]], tuple[str, ...]]:
  params = list(inspect.signature(builder).parameters.values())[1:]  # after ctx
  if any(p.kind == p.VAR_KEYWORD for p in params):
    return None, ()
  keys = tuple(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
  required = tuple(p.name for p in params
                   if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty)
  return keys, required


def register(name: str, *, needs: Sequence[str] = (), host: bool = False,
             verifier: bool = False) -> Callable[[Callable], Callable]:
  """Decorator registering `builder(ctx: RewardContext, **keys) -> RewardFn` under `name`."""
  bad = sorted(set(needs) - set(NEEDS))
  if bad:
    raise ValueError(f"reward {name!r} declares unknown needs {bad}; known: {list(NEEDS)}")

  def deco(builder: Callable) -> Callable:
    if name in _REGISTRY and _REGISTRY[name].builder is not builder:
      raise ValueError(f"reward {name!r} is registered twice")
    keys, required = _signature_keys(builder)
    clash = sorted(set(keys or ()) & set(RESERVED_KEYS))
    if clash:
      raise ValueError(f"reward {name!r}: builder keys {clash} clash with the reserved "
                       f"config keys {list(RESERVED_KEYS)}")
    _REGISTRY[name] = _Entry(builder, RewardDecl(name, tuple(needs), host, verifier), keys,
                             required)
    return builder
  return deco


def register_text_scorer(name: str) -> Callable[[Callable], Callable]:
  """Decorator: `scorer_builder(ctx, **keys) -> (record, completion_text) -> float` for the
  verifier `name` (registered first; the keys are those of its reward builder)."""
  def deco(scorer_builder: Callable) -> Callable:
    _TEXT_SCORERS[name] = scorer_builder
    return scorer_builder
  return deco


def names() -> List[str]:
  """All registered reward names, sorted."""
  return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
  try:
    return _REGISTRY[name]
  except (KeyError, TypeError):
    close = difflib.get_close_matches(str(name), names(), n=1, cutoff=0.0)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"config.rewards has unknown reward {name!r}{hint}; known rewards: "
                     f"{', '.join(names())}"
                     ) from None


def decl(name: str) -> RewardDecl:
  """The `RewardDecl` of a registered reward (ValueError naming the closest name if unknown)."""
  return _entry(name).decl


def _as_dict(spec) -> Dict[str, Any]:
  if isinstance(spec, str):
    return {"name": spec}
  if hasattr(spec, "to_dict"):
    spec = spec.to_dict()
  if not isinstance(spec, Mapping):
    raise ValueError(f"a config.rewards entry must be a reward name or a dict with 'name', "
                     f"got {spec!r}")
  if "name" not in spec:
    raise ValueError(f"config.rewards entry {dict(spec)!r} has no 'name'; known rewards: "
                     f"{', '.join(names())}")
  return dict(spec)


def _parse(spec) -> tuple[_Entry, Dict[str, Any], Dict[str, Any]]:
  """spec -> (entry, builder kwargs, {"weight", "label"})."""
  d = _as_dict(spec)
  entry = _entry(d["name"])
  name = entry.decl.name
  kwargs = {k: v for k, v in d.items() if k not in RESERVED_KEYS}
  if entry.keys is not None:
    accepted = list(RESERVED_KEYS) + list(entry.keys)
    for key in kwargs:
      if key not in entry.keys:
        raise ValueError(f"reward {name!r} does not take the key {key!r}; accepted keys: "
                         f"{', '.join(accepted)}")
    missing = [k for k in entry.required if k not in kwargs]
    if missing:
      raise ValueError(f"reward {name!r} needs the key {missing[0]!r}; accepted keys: "
                       f"{', '.join(accepted)}")
  weight = d.get("weight", 1.0)
  if (isinstance(weight, bool) or not isinstance(weight, (int, float, np.number))
      or not math.isfinite(float(weight))):
    raise ValueError(f"reward {name!r}: weight must be a finite number, got {weight!r}")
  label = d.get("label", name)
  if not isinstance(label, str) or not label:
    raise ValueError(f"reward {name!r}: label must be a non-empty string, got {label!r}")
  return entry, kwargs, {"weight": float(weight), "label": label}


def with_needs(fn: RewardFn, needs: Sequence[str]) -> RewardFn:
  """Marks a built fn as needing `needs` instead of its declaration's (e.g. a fallback to
  answer tokens when the context has no record table); `build_rewards` reads it."""
  fn.reward_needs = tuple(needs)  # type: ignore[attr-defined]
  return fn


def build_rewards(specs: Sequence[Any], ctx: RewardContext) -> List[Reward]:
  """Builds every entry of `config.rewards` (names or dicts) into a `Reward`.

  Metric names are the registry name or the entry's "label", made unique with a
  suffix: two `exact_match` entries are named "exact_match" and "exact_match_1".
  """
  if isinstance(specs, (str, Mapping)) or hasattr(specs, "to_dict"):
    specs = [specs]
  out: List[Reward] = []
  taken: set = set()
  for spec in specs:
    entry, kwargs, meta = _parse(spec)
    fn = entry.builder(ctx, **kwargs)
    if not callable(fn):
      raise ValueError(f"reward {entry.decl.name!r}: its builder returned {fn!r}, not a "
                       "reward function")
    d = entry.decl
    if hasattr(fn, "reward_needs"):
      d = dataclasses.replace(d, needs=tuple(fn.reward_needs))
    label, i = meta["label"], 0
    while label in taken:
      i += 1
      label = f"{meta['label']}_{i}"
    taken.add(label)
    out.append(Reward(label, fn, meta["weight"], d))
  return out


def text_scorer(spec, ctx: RewardContext) -> TextScorer:
  """The text form of a verifier reward: `(record, completion_text) -> score`, for held-out
  accuracy on decoded completions (the text before EOS)."""
  entry, kwargs, _ = _parse(spec)
  name = entry.decl.name
  if not entry.decl.verifier or name not in _TEXT_SCORERS:
    verifiers = [n for n in names() if _REGISTRY[n].decl.verifier and n in _TEXT_SCORERS]
    raise ValueError(f"reward {name!r} is not a verifier with a text form; verifiers: "
                     f"{', '.join(verifiers)}")
  return _TEXT_SCORERS[name](ctx, **kwargs)


# ----------------------------------------------------------------------------- host rewards

def prompt_text(ctx: RewardContext, prompt) -> str:
  """A record's prompt as the policy saw it: chat messages rendered with the tokenizer's
  template (with the generation prompt), a string as is."""
  if isinstance(prompt, str):
    return prompt
  if isinstance(prompt, Sequence):
    return ctx.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True)
  raise ValueError(f"a record's prompt must be a string or chat messages, got "
                   f"{type(prompt).__name__}")


def _rows(ids: np.ndarray, mask: np.ndarray) -> List[List[int]]:
  return [ids[i][mask[i]].tolist() for i in range(ids.shape[0])]


class HostBatch:
  """One batch on the host, decoded on first use: `completions` (text before EOS),
  `prompts`, `records` (per row, or None without a record table), `answers`,
  `record_index` (or None)."""

  def __init__(self, ctx: RewardContext, arrays: Mapping[str, np.ndarray], who: str):
    self.ctx, self.who = ctx, who
    self._a = {k: np.asarray(v) for k, v in arrays.items()}
    self.size = self._a["completion_ids"].shape[0]
    self.record_index = self._a.get("record_index")
    if self.record_index is not None:
      n = len(ctx.records)
      bad = [int(i) for i in self.record_index if not 0 <= int(i) < n]
      if bad:
        raise RewardError(f"{who}: record_index {bad[0]} is outside the record table "
                          f"(size {n})")

  def _decode(self, ids_key: str, mask_key: str) -> List[str]:
    decode = self.ctx.tokenizer.decode
    return [decode(r) for r in _rows(self._a[ids_key], self._a[mask_key].astype(bool))]

  def where(self, i: int) -> str:
    """'row i' plus its record index when known, for error messages."""
    return f"row {i}" + ("" if self.record_index is None
                          else f" (record {int(self.record_index[i])})")

  @functools.cached_property
  def completions(self) -> List[str]:
    return self._decode("completion_ids", "completion_mask")

  @functools.cached_property
  def records(self) -> Optional[List[Mapping[str, Any]]]:
    if self.record_index is None:
      return None
    return [self.ctx.records[int(i)] for i in self.record_index]

  @functools.cached_property
  def prompts(self) -> List[str]:
    if self.records is not None:
      return [prompt_text(self.ctx, r.get("prompt", "")) for r in self.records]
    return self._decode("prompt_ids", "prompt_mask")

  @property
  def has_answers(self) -> bool:
    """Whether answers are known (a record table, or answer_ids in the batch)."""
    return self.records is not None or "answer_ids" in self._a

  @functools.cached_property
  def answers(self) -> List[Optional[str]]:
    if self.records is not None:
      return [r.get("answer") for r in self.records]
    if "answer_ids" in self._a:
      return self._decode("answer_ids", "answer_mask")
    return [None] * self.size


def host_reward(ctx: RewardContext, score: Callable[[HostBatch], Any], *, who: str,
                use_records: bool = True, answers: str = "none") -> RewardFn:
  """A reward function scoring a `HostBatch` in Python through one `jax.pure_callback`.

  `score(batch) -> [N]` numbers. The completion is cut before its first EOS. The
  record table is used when `use_records` and `ctx.records` is set (then
  `batch_extras["record_index"]` is required); otherwise the answers are the decoded
  `batch_extras["answer_ids"]`, with `answers` "required" or "optional" (used when
  present), or not read ("none").
  """
  if answers not in ("none", "optional", "required"):
    raise ValueError(f"answers must be 'none', 'optional' or 'required', got {answers!r}")
  tok = ctx.tokenizer
  records = use_records and ctx.records is not None

  def host(arrays):
    batch = HostBatch(ctx, arrays, who)
    out = np.asarray(score(batch), np.float32)
    if out.shape != (batch.size,):
      raise RewardError(f"{who}: the scorer returned shape {out.shape}, expected "
                        f"[N]=({batch.size},)")
    return out

  def fn(prompt_ids, completion_ids, completion_mask, batch_extras):
    check_reward_inputs(prompt_ids, completion_ids, completion_mask)
    pmask = (batch_extras or {}).get("prompt_mask")
    arrays = {
        "prompt_ids": prompt_ids,
        "prompt_mask": (prompt_ids != tok.pad_id) if pmask is None else pmask.astype(bool),
        "completion_ids": completion_ids,
        "completion_mask": truncate_at_eos(completion_ids, completion_mask, tok.eos_id)}
    if records:
      arrays["record_index"] = jnp.asarray(get_extra(batch_extras, "record_index", who),
                                           jnp.int32)
    elif answers == "required" or (answers == "optional" and batch_extras
                                   and "answer_ids" in batch_extras):
      ans = get_extra(batch_extras, "answer_ids", who)
      amask = batch_extras.get("answer_mask")
      arrays["answer_ids"] = ans
      arrays["answer_mask"] = (ans != tok.pad_id) if amask is None else amask.astype(bool)
    out = jax.ShapeDtypeStruct((completion_ids.shape[0],), jnp.float32)
    return jax.pure_callback(host, out, arrays, vmap_method="sequential")
  return fn


def score_rows(batch: HostBatch, check: Callable[[str, Optional[str]], float],
               targets: Sequence[Optional[str]], *, who: str) -> np.ndarray:
  """`check(completion, target)` per row; an error names the reward and the row."""
  out = np.zeros(batch.size, np.float32)
  for i, (c, t) in enumerate(zip(batch.completions, targets)):
    try:
      out[i] = float(check(c, t))
    except Exception as e:  # pylint: disable=broad-except
      raise RewardError(f"{who}: {type(e).__name__}: {e} on {batch.where(i)}") from e
  return out
