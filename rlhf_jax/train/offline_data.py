"""Data adapters for the offline loop: sources, unpaired (KTO) batches, cached reference log-probs.

* `load_records(config)` -> (train, eval) record sequences from `config.data.source`.
* `batch_fns(kind, tok, data_cfg)` -> (example_fn, collate) for "sft", "preference",
  "unpaired" or "list" (ranked responses); `iterator(...)` wraps them in a resumable `DataIterator`.
* `to_unpaired(pairs)`: each (prompt, chosen, rejected) becomes two labelled completions.
* `collate_unpaired`: `completion_*`, `label` and the mismatched `kl_*` sequences (a
  record's prompt with another record's completion) KTO's reference point is estimated from.
* `RefTable` / `WithRef`: reference log-probs computed once over a dataset, saved to
  `<workdir>/ref_logps_<fingerprint>.safetensors`, and attached to every batch by example index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import safetensors.numpy

from rlhf_jax import data as data_lib
from rlhf_jax.data import batching
from rlhf_jax.data.tokenizer import pad_sequences

SOURCES = ("synthetic", "jsonl", "tfds")
INDEX_KEY = "example_index"


def plain(x) -> dict:
  """A config block (ConfigDict, dict or None) as a plain dict."""
  return dict(x.to_dict() if hasattr(x, "to_dict") else (x or {}))


def tfds_record_fn(fields: Mapping[str, str]) -> Callable[[Mapping[str, Any]], dict]:
  """Maps a raw TFDS example to a record: {our field: example[their feature]} as text
  (`label` as bool)."""
  from rlhf_jax.data import tfds_source  # pylint: disable=import-outside-toplevel
  fields = dict(fields)

  def fn(ex):
    out = {}
    for ours, theirs in fields.items():
      if theirs not in ex:
        raise KeyError(f"TFDS example has no feature {theirs!r} (config.data.fields."
                       f"{ours}); it has {sorted(ex)}")
      v = ex[theirs]
      out[ours] = (bool(np.asarray(v)) if ours == "label"
                   else tfds_source.to_text(v, field=theirs))
    return out
  return fn


def load_records(config, *, build_task) -> tuple[Sequence, Sequence]:
  """(train records, eval records) from `config.data` (see module doc of offline_loop)."""
  d = config.data
  source = d.get("source", "synthetic")
  if source == "synthetic":
    task_cfg = plain(config.task)
    train = build_task(task_cfg).generate(int(d.train_size), seed=int(config.seed),
                                          split="train")
    clean = dict(task_cfg)
    if "flip_rate" in clean:  # evaluate against the true labels
      clean["flip_rate"] = 0.0
    evals = build_task(clean).generate(int(d.eval_size), seed=int(config.seed), split="test")
    return train, evals
  if source == "jsonl":
    if not d.get("path"):
      raise ValueError("config.data.source='jsonl' needs config.data.path")
    for key in ("path", "eval_path"):
      path = d.get(key)
      if path and not os.path.exists(path):
        raise FileNotFoundError(f"config.data.{key}={path!r} does not exist (relative paths are "
                                f"from {os.getcwd()!r}); point it at a .jsonl file")
      if path and os.path.isdir(path):
        raise IsADirectoryError(f"config.data.{key}={path!r} is a directory; point it at a "
                                ".jsonl file (one JSON object per line)")
    fmt = d.get("format", "auto")
    skip = bool(d.get("skip_invalid", False))
    train = data_lib.load_jsonl(d.path, format=fmt, skip_invalid=skip).records
    evals = (data_lib.load_jsonl(d.eval_path, format=fmt, skip_invalid=skip).records
             if d.get("eval_path") else train[: max(1, len(train) // 10)])
    return train, evals
  if source == "tfds":
    from rlhf_jax.data import tfds_source  # pylint: disable=import-outside-toplevel
    if not d.get("name"):
      raise ValueError("config.data.source='tfds' needs config.data.name (a TFDS builder)")
    fields = plain(d.get("fields"))
    record_fn = tfds_record_fn(fields) if fields else None
    kw = dict(record_fn=record_fn, data_dir=d.get("data_dir") or None)
    train = tfds_source.TfdsSource(d.name, split=d.get("split", "train"), **kw)
    evals = tfds_source.TfdsSource(d.name, split=d.get("eval_split", "test"), **kw)
    for what, src in (("split", train), ("eval_split", evals)):
      if len(src) == 0:
        raise ValueError(f"TFDS {d.name!r} config.data.{what} is empty (empty dataset)")
    return train, evals
  raise ValueError(f"config.data.source={source!r} is unknown; use one of {SOURCES}")


class _View(Sequence):
  """A lazy, index-mapped view of a record sequence."""

  def __init__(self, source: Sequence, length: int, fn: Callable[[int], dict]):
    self._source, self._len, self._fn = source, length, fn

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    if not -self._len <= i < self._len:
      raise IndexError(i)
    return self._fn(int(i) % self._len)


def to_unpaired(records: Sequence) -> Sequence:
  """Unpaired (KTO) records with their mismatched partner completion.

  Preference pairs: item 2k is (prompt, chosen, label=True), item 2k+1 is (prompt,
  rejected, label=False). Records that already have `completion` and `label` (JSONL
  format "kto") are used as they are. Each item also gets `kl_completion`: the
  completion of item (i + offset) mod N (offset 3 for pairs, so a different prompt;
  1 otherwise), a fixed mismatched pair from which KTO's reference point is estimated.
  """
  if not len(records):
    raise ValueError("no records for unpaired (KTO) training (empty dataset)")
  paired = not ("completion" in records[0] and "label" in records[0])

  def item(i):
    if not paired:
      return records[i]
    rec = records[i // 2]
    for k in ("prompt", "chosen", "rejected"):
      if k not in rec:
        raise KeyError(f"record {i // 2} has no field {k!r}: unpaired (KTO) training needs "
                       "(prompt, completion, label) or (prompt, chosen, rejected) records")
    side = "chosen" if i % 2 == 0 else "rejected"
    return {"prompt": rec["prompt"], "completion": rec[side], "label": i % 2 == 0}

  n = 2 * len(records) if paired else len(records)
  offset = 3 if paired else 1
  return _View(records, n, lambda i: dict(
      item(i), kl_completion=item((i + offset) % n)["completion"]))


def to_sft(records: Sequence) -> Sequence:
  """SFT records: `messages` or (prompt, completion) as they are; preference pairs
  train on (prompt, chosen)."""
  if not len(records):
    raise ValueError("no records for SFT (empty dataset)")
  first = records[0]
  if "messages" in first or "completion" in first:
    return records
  if "chosen" not in first or "prompt" not in first:
    raise KeyError(f"SFT records need 'messages', (prompt, completion) or (prompt, chosen); "
                   f"the first record has {sorted(first)}")
  return _View(records, len(records),
               lambda i: {"prompt": records[i]["prompt"], "completion": records[i]["chosen"]})


def with_index(source: Sequence) -> Sequence:
  """Adds `example_index` (the record's position) to every record."""
  return _View(source, len(source), lambda i: dict(source[i], **{INDEX_KEY: i}))


def make_unpaired_example_fn(tok, *, max_prompt_length: int, max_length: int,
                             truncation: str = "error", passthrough: Sequence[str] = (),
                             **kwargs) -> Callable:
  """record {"prompt", "completion", "label", "kl_completion"} -> `completion_ids`,
  `completion_loss_mask`, `kl_ids`, `kl_loss_mask` (prompt + the mismatched completion),
  `label` (1.0 desirable)."""
  batching.check_policy(truncation)
  if max_prompt_length >= max_length:
    raise ValueError(f"max_prompt_length={max_prompt_length} must be < max_length={max_length}")

  def fn(record, index):
    for k in ("prompt", "completion", "label", "kl_completion"):
      if k not in record:
        raise KeyError(f"example {index} has no field {k!r}; unpaired (KTO) records need "
                       "prompt, completion and label (kl_completion is added by to_unpaired)")
    where = batching._describe(index, record)  # pylint: disable=protected-access
    out = {"label": float(bool(record["label"])),
           **batching.passthrough_fields(record, passthrough, index)}
    for name, field in (("completion", "completion"), ("kl", "kl_completion")):
      p, r, m = batching.encode_prompt_response(tok, record["prompt"], record[field], **kwargs)
      p = batching.fit(p, max_prompt_length, truncation=truncation, what="prompt",
                       where=where, fix=f"max_prompt_length={max_prompt_length}")
      budget = max_length - len(p)
      if len(r) > budget:
        # the mismatched completion is only a KL sample: always cut it to fit
        policy = ("truncate_right" if truncation.startswith("truncate") or name == "kl"
                  else truncation)
        r = batching.fit(r, budget, truncation=policy, what=field, where=where,
                         fix=f"max_length={max_length} - prompt {len(p)}")
        m = m[:len(r)]
      out[f"{name}_ids"], out[f"{name}_loss_mask"] = p + r, [0] * len(p) + m
    return out
  return fn


def collate_unpaired(examples: Sequence[dict], *, pad_id: int, max_length: int) -> dict:
  """Right-pads `completion_*` and `kl_*` to [B, T]; `label` (and passthrough) [B]."""
  out = {}
  for name in ("completion", "kl"):
    out[f"{name}_ids"], out[f"{name}_mask"] = pad_sequences(
        [e[f"{name}_ids"] for e in examples], length=max_length, pad_id=pad_id,
        padding_side="right")
    out[f"{name}_loss_mask"], _ = pad_sequences(
        [e[f"{name}_loss_mask"] for e in examples], length=max_length, pad_id=0,
        padding_side="right")
  known = {f"{n}_{k}" for n in ("completion", "kl") for k in ("ids", "loss_mask")}
  out.update({k: np.asarray([e[k] for e in examples], np.float32)
              for k in examples[0] if k not in known})
  return out


def make_list_example_fn(tok, *, num_responses: int, max_prompt_length: int, max_length: int,
                         truncation: str = "error", passthrough: Sequence[str] = (),
                         **kwargs) -> Callable:
  """record {"prompt", "responses": [best, ..., worst]} -> `responses_ids` /
  `responses_loss_mask` (K lists of prompt + response), `responses_valid` (K bools; rows with
  fewer than K responses are padded with invalid entries). Passthrough fields that are
  lists (per-response values, e.g. "levels") are padded to K with 0."""
  encode = batching.make_response_encoder(
      tok, max_prompt_length=max_prompt_length, max_length=max_length, truncation=truncation,
      **kwargs)

  def fn(record, index):
    responses = record.get("responses")
    if not isinstance(responses, (list, tuple)) or not responses:
      raise KeyError(f"example {index} has no list field 'responses'; listwise records need "
                     "prompt and responses (best first)")
    if len(responses) > num_responses:
      raise ValueError(f"example {index} has {len(responses)} responses, more than "
                       f"data.num_responses={num_responses}; raise it or drop responses")
    out = {"responses_ids": [], "responses_loss_mask": [],
           "responses_valid": [i < len(responses) for i in range(num_responses)]}
    where = batching._describe(index, record)  # pylint: disable=protected-access
    for i, r in enumerate(responses):
      ids, mask = encode(record["prompt"], r, f"response {i}", where)
      out["responses_ids"].append(ids)
      out["responses_loss_mask"].append(mask)
    pad = num_responses - len(responses)
    out["responses_ids"] += [[]] * pad
    out["responses_loss_mask"] += [[]] * pad
    for k, v in batching.passthrough_fields(record, passthrough, index).items():
      if isinstance(v, (list, tuple)):
        if len(v) != len(responses):
          raise ValueError(f"example {index}: field {k!r} has {len(v)} values for "
                           f"{len(responses)} responses")
        v = list(v) + [0] * pad
      out[k] = v
    return out
  return fn


def pad_lists(examples: Sequence[dict], prefix: str, *, pad_id: int, max_length: int) -> dict:
  """Right-pads each example's K sequences `{prefix}_ids` / `{prefix}_loss_mask` to
  [B, K, T], with `{prefix}_mask` [B, K, T] (real tokens) and `{prefix}_valid` [B, K]."""
  b, k = len(examples), len(examples[0][f"{prefix}_ids"])
  out = {}
  for name, pad in (("ids", pad_id), ("loss_mask", 0)):
    flat = [seq for e in examples for seq in e[f"{prefix}_{name}"]]
    arr, mask = pad_sequences(flat, length=max_length, pad_id=pad, padding_side="right")
    out[f"{prefix}_{name}"] = arr.reshape(b, k, max_length)
    if name == "ids":
      out[f"{prefix}_mask"] = mask.reshape(b, k, max_length)
  out[f"{prefix}_valid"] = np.asarray([e[f"{prefix}_valid"] for e in examples], bool)
  return out


def collate_list(examples: Sequence[dict], *, pad_id: int, max_length: int) -> dict:
  """Right-pads `responses_*` to [B, K, T]; `responses_valid` [B, K]; passthrough fields
  stacked (integer lists stay integer, e.g. TRPA's `levels` [B, K])."""
  out = pad_lists(examples, "responses", pad_id=pad_id, max_length=max_length)
  known = {"responses_ids", "responses_loss_mask", "responses_valid"}
  for key in (key for key in examples[0] if key not in known):
    vals = np.asarray([e[key] for e in examples])
    out[key] = vals.astype(np.int32 if vals.dtype.kind in "iub" else np.float32)
  return out


def batch_fns(kind: str, tok, data_cfg, *, passthrough: Sequence[str] = ()):
  """(example_fn, collate) for kind "sft" | "preference" | "unpaired" | "list"."""
  d = data_cfg
  trunc = d.get("truncation", "error")
  max_len = int(d["max_length"])
  if kind == "sft":
    fn = batching.make_sft_example_fn(tok, max_length=max_len, truncation=trunc,
                                      passthrough=passthrough)
    return fn, lambda exs: batching.collate_sft(exs, pad_id=tok.pad_id, max_length=max_len)
  kw = dict(max_prompt_length=int(d["max_prompt_length"]), max_length=max_len, truncation=trunc,
            passthrough=passthrough)
  if kind == "preference":
    fn = batching.make_preference_example_fn(tok, **kw)
    return fn, lambda exs: batching.collate_preference(exs, pad_id=tok.pad_id,
                                                       max_length=max_len)
  if kind == "unpaired":
    fn = make_unpaired_example_fn(tok, **kw)
    return fn, lambda exs: collate_unpaired(exs, pad_id=tok.pad_id, max_length=max_len)
  if kind == "list":
    if not d.get("num_responses"):
      raise ValueError("listwise records (a 'responses' list) need config.data.num_responses "
                       "(K, the most responses per record)")
    fn = make_list_example_fn(tok, num_responses=int(d["num_responses"]), **kw)
    return fn, lambda exs: collate_list(exs, pad_id=tok.pad_id, max_length=max_len)
  raise ValueError(f"batch kind {kind!r} is unknown; use 'sft', 'preference', 'unpaired' or "
                   "'list'")


def iterator(source, example_fn, collate, *, batch_size: int, seed: int, train: bool,
             pack_max_length: int | None = None, pad_id: int = 0) -> data_lib.DataIterator:
  """A resumable iterator: shuffled and endless for training, one ordered pass for eval."""
  if pack_max_length:
    make = lambda: batching.Packer(batch_size, max_length=pack_max_length,  # noqa: E731
                                   pad_id=pad_id)
  else:
    make = lambda: batching.Batcher(batch_size, collate)  # noqa: E731
  return data_lib.DataIterator(source, example_fn=example_fn, make_batcher=make, seed=seed,
                               shuffle=train, num_epochs=None if train else 1)


def fingerprint(*parts: Any) -> str:
  """A short stable hash of JSON-able parts (config blocks, sizes)."""
  blob = json.dumps(parts, sort_keys=True, default=str).encode()
  return hashlib.sha1(blob).hexdigest()[:12]


class RefTable:
  """Reference log-probs per example index, computed once (or loaded from `path`)."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    self.arrays = {k: np.asarray(v, np.float32) for k, v in arrays.items()}

  @classmethod
  def build(cls, path: str, source: Sequence, example_fn, collate, ref_fn: Callable,
            *, batch_size: int) -> "RefTable":
    """Loads `path` if present, else runs `ref_fn(batch) -> {key: [B, ...]}` over every record
    of `source` in order (the last batch padded by repetition) and saves it there."""
    if os.path.exists(path):
      try:
        table = cls(safetensors.numpy.load_file(path))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("reference log-prob cache %s is unreadable (%s); recomputing", path, e)
      else:
        if all(len(v) == len(source) for v in table.arrays.values()):
          logging.info("reference log-probs loaded from %s", path)
          return table
    examples, index = [], []
    for i in range(len(source)):
      try:
        examples.append(example_fn(source[i], i))
        index.append(i)
      except batching.SkipExample:
        pass
    if not examples:
      raise ValueError("every record was skipped; no reference log-probs to compute")
    arrays: dict[str, np.ndarray] = {}
    for start in range(0, len(examples), batch_size):
      chunk = examples[start:start + batch_size]
      n = len(chunk)
      chunk = chunk + [chunk[0]] * (batch_size - n)
      out = ref_fn({k: v for k, v in collate(chunk).items()
                    if isinstance(v, np.ndarray) and v.dtype != object})
      for k, v in out.items():
        v = np.asarray(v)
        col = arrays.setdefault(k, np.full((len(source),) + v.shape[1:], np.nan, np.float32))
        col[index[start:start + n]] = v[:n]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    safetensors.numpy.save_file(arrays, tmp)  # write then rename: never a partial cache
    os.replace(tmp, path)
    logging.info("reference log-probs for %d examples saved to %s", len(examples), path)
    return cls(arrays)

  def lookup(self, batch: dict) -> dict:
    """Adds the table's columns for the batch's `example_index` rows."""
    if INDEX_KEY not in batch:
      raise KeyError(f"batch has no {INDEX_KEY!r}; build its source with with_index()")
    idx = np.asarray(batch[INDEX_KEY]).astype(np.int64)
    return dict(batch, **{k: v[idx] for k, v in self.arrays.items()})


class WithRef:
  """Wraps a `DataIterator`: same state and precheck, batches carry reference log-probs."""

  def __init__(self, inner, table: RefTable):
    self._inner, self._table = inner, table

  def __iter__(self):
    return self

  def __next__(self):
    return self._table.lookup(next(self._inner))

  def get_state(self):
    return self._inner.get_state()

  def set_state(self, state):
    self._inner.set_state(state)

  def precheck(self):
    return self._inner.precheck()
