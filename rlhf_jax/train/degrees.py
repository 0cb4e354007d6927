"""Preference-degree variants for SSPO (`config.data.degrees`, offline preference paradigm).

SSPO (Li et al. 2024, "Self-supervised Preference Optimization: Enhance Your Language
Model with Preference Degree Awareness") adds to the alignment loss a self-supervised
task: the chosen response with k of its key parts removed, k = 0..K, and the model
classifies k. Here:

- **key parts** are the matches of the regular expression `key` in the chosen response
  (default `\\S+`: words); variant k removes k of them, drawn per record from
  `np.random.default_rng([seed, record index])`, so every epoch and a resumed run see the
  same variants. A variant whose response has fewer than k parts is masked out.
- **the classifier is the policy itself**: the degree logits are its next-token logits,
  read after the variant's last token, at the K + 1 `class_tokens` (default "0".."K"),
  so no parameters are added and the model exports as it is. [Our reading: the
  methods catalogue lists the method as unverified; the paper's abstract fixes the
  self-supervised degree loss, not the classifier.]

    config.loss = "sspo"
    config.data.degrees = {"max_removed": 2, "key": "a"}   # class_tokens default "0", "1", "2"

Batches gain `degree_ids`, `degree_mask`, `degree_loss_mask` [B, K+1, T], `degree_labels`
(int, = k) and `degree_valid` [B, K+1]; `degree_logits` computes [B, K+1, K+1].
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models as models_lib
from rlhf_jax.train.offline_data import _View, pad_lists

KEYS = ("max_removed", "key", "class_tokens")
FIELD = "degree_responses"
BATCH_KEYS = ("degree_ids", "degree_mask", "degree_loss_mask", "degree_labels", "degree_valid")


def settings(cfg: Mapping[str, Any] | None) -> dict:
  """The checked `config.data.degrees` ({} when unset) with defaults filled in."""
  cfg = dict(cfg or {})
  if not cfg:
    return {}
  unknown = sorted(set(cfg) - set(KEYS))
  if unknown:
    raise ValueError(f"config.data.degrees has unknown keys {unknown}; it takes {list(KEYS)}")
  k = cfg.get("max_removed")
  if not isinstance(k, int) or isinstance(k, bool) or k < 1:
    raise ValueError(f"config.data.degrees.max_removed must be an integer >= 1 (the most key "
                     f"parts a variant loses), got {k!r}")
  key = cfg.get("key", r"\S+")
  try:
    pattern = re.compile(key)
  except (re.error, TypeError) as e:
    raise ValueError(f"config.data.degrees.key={key!r} is not a regular expression: {e}") from None
  if pattern.search("") is not None:
    raise ValueError(f"config.data.degrees.key={key!r} matches the empty string; give a pattern "
                     "that matches each key part (e.g. '\\\\S+' for words)")
  classes = tuple(cfg.get("class_tokens") or [str(i) for i in range(k + 1)])
  if len(classes) != k + 1 or not all(isinstance(t, str) and t for t in classes):
    raise ValueError(f"config.data.degrees.class_tokens must be {k + 1} non-empty strings (one "
                     f"per degree 0..{k}), got {classes!r}")
  return {"max_removed": k, "key": key, "class_tokens": classes}


def check(cfg: Mapping[str, Any] | None, paradigm: str, loss_needs_degrees: bool) -> None:
  """Named errors: degrees without a loss that reads them, or the reverse."""
  deg = settings(cfg)
  if deg and paradigm != "preference":
    raise ValueError("config.data.degrees applies to paradigm 'preference' only")
  if deg and not loss_needs_degrees:
    raise ValueError("config.data.degrees builds preference-degree variants that only a loss "
                     "taking degree_logits reads (config.loss='sspo'); unset one of them")
  if loss_needs_degrees and not deg:
    raise ValueError("config.loss='sspo' classifies preference degrees: set config.data.degrees, "
                     "e.g. {'max_removed': 2} (key parts: words) or {'max_removed': 2, 'key': 'a'}")


def class_ids(tok, classes: Sequence[str]) -> tuple[int, ...]:
  """The token id of each class string; each must be exactly one token."""
  out = []
  for t in classes:
    ids = tok.encode(t)
    if len(ids) != 1:
      raise ValueError(f"config.data.degrees.class_tokens: {t!r} encodes to {len(ids)} tokens "
                       f"{ids}; each class must be one token of the tokenizer")
    out.append(int(ids[0]))
  if len(set(out)) != len(out):
    raise ValueError(f"config.data.degrees.class_tokens {tuple(classes)} share token ids {out}")
  return tuple(out)


def remove_parts(text: str, key: str, k: int, rng: np.random.Generator) -> str | None:
  """`text` without k of the matches of `key` (chosen by `rng`); None if it has fewer."""
  spans = [m.span() for m in re.finditer(key, text)]
  if k > len(spans):
    return None
  drop = set(rng.choice(len(spans), size=k, replace=False).tolist()) if k else set()
  out, pos = [], 0
  for i, (a, b) in enumerate(spans):
    if i in drop:
      out.append(text[pos:a])
      pos = b
  out.append(text[pos:])
  return "".join(out)


def attach(records: Sequence, deg: Mapping[str, Any], seed: int) -> Sequence:
  """Records with `degree_responses`: K + 1 variants of the chosen response (None: too few
  key parts), made when a record is read."""

  def item(i):
    rec = records[i]
    if not isinstance(rec, Mapping) or "chosen" not in rec:
      raise KeyError(f"record {i} has no 'chosen' response to make preference-degree "
                     "variants of (config.data.degrees)")
    rng = np.random.default_rng([int(seed), i])
    variants = [remove_parts(str(rec["chosen"]), deg["key"], k, rng)
                for k in range(deg["max_removed"] + 1)]
    return dict(rec, **{FIELD: variants})
  return _View(records, len(records), item)


def wrap(example_fn: Callable, collate: Callable, encode: Callable, pad_id: int,
         max_length: int) -> tuple[Callable, Callable]:
  """(example_fn, collate) that also encode and pad the degree variants."""

  def fn(record, index):
    out = example_fn(record, index)
    ids, loss_masks, valid = [], [], []
    for k, text in enumerate(record[FIELD]):
      i, m = encode(record["prompt"], text if text is not None else "",
                    f"degree-{k} variant", f"record {index}")
      ids.append(i)
      loss_masks.append(m)
      valid.append(text is not None)
    out.update({"degree_ids": ids, "degree_loss_mask": loss_masks, "degree_valid": valid})
    return out

  def coll(examples):
    taken = ("degree_ids", "degree_loss_mask", "degree_valid")
    base = collate([{k: v for k, v in e.items() if k not in taken} for e in examples])
    base.update(pad_lists(examples, "degree", pad_id=pad_id, max_length=max_length))
    b, m = base["degree_valid"].shape
    base["degree_labels"] = np.broadcast_to(np.arange(m, dtype=np.int32), (b, m)).copy()
    return base
  return fn, coll


def degree_logits(model, params, batch: Mapping[str, jax.Array],
                  class_token_ids: Sequence[int]) -> jax.Array:
  """The policy's next-token logits after each variant's last token, at the class tokens:
  [B, M, T] variants -> [B, M, C]."""
  b, m, t = batch["degree_ids"].shape
  ids = batch["degree_ids"].reshape(b * m, t)
  mask = batch["degree_mask"].reshape(b * m, t)
  h = model.hidden(params, ids, mask)
  h_last = jnp.take_along_axis(h, models_lib.last_index(mask)[:, None, None], axis=1)  # [B*M, 1, D]
  logits = model.logits_from_hidden(params, h_last)[:, 0]      # [B*M, V]
  picked = jnp.take(logits, jnp.asarray(class_token_ids, jnp.int32), axis=-1)
  return picked.astype(jnp.float32).reshape(b, m, len(class_token_ids))
