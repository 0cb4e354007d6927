"""Deterministic, resumable batch iterators over random-access record sources.

`DataIterator` walks a per-epoch permutation of the source (numpy `default_rng([seed,
epoch])`), turns each record into an example, and fills a `Batcher` or `Packer`. Its
state is a JSON-serialisable dict {"seed", "epoch", "index", "skipped"}: `index` counts
records consumed in the current epoch, so restoring a state replays exactly the batches an
uninterrupted run would have produced. Batches may span epoch boundaries; with
`num_epochs` set, the final incomplete batch is dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from rlhf_jax.data import batching
from rlhf_jax.data.tokenizer import Tokenizer

STATE_KEYS = ("seed", "epoch", "index", "skipped")


class DataIterator:
  """Iterator of fixed-shape numpy batches with a checkpointable `get_state()`.

  Args:
    source: a random-access sequence of records (list, `JsonlDataset`, `TfdsSource`...).
    example_fn: (record, index) -> example dict; may raise `batching.SkipExample`.
    make_batcher: () -> a fresh `Batcher` or `Packer`.
    seed: shuffling seed.
    shuffle: permute each epoch (otherwise source order).
    num_epochs: stop after this many passes (None: forever).
  """

  def __init__(self, source: Sequence[Any], *, example_fn: Callable[[Any, int], dict],
               make_batcher: Callable[[], Any], seed: int = 0, shuffle: bool = True,
               num_epochs: int | None = None):
    if len(source) == 0:
      raise ValueError("source is empty: the data iterator needs at least one record")
    self._source, self._example_fn, self._make_batcher = source, example_fn, make_batcher
    self._shuffle, self._num_epochs = shuffle, num_epochs
    self._state = {"seed": int(seed), "epoch": 0, "index": 0, "skipped": 0}
    self._perm_cache: tuple[int, np.ndarray] | None = None
    self._accepted_in_epoch = 0

  def _perm(self, epoch: int) -> np.ndarray:
    if self._perm_cache is None or self._perm_cache[0] != epoch:
      n = len(self._source)
      perm = (np.random.default_rng([self._state["seed"], epoch]).permutation(n)
              if self._shuffle else np.arange(n))
      self._perm_cache = (epoch, perm)
    return self._perm_cache[1]

  def get_state(self) -> dict[str, int]:
    """A JSON-serialisable copy of the position in the stream."""
    return dict(self._state)

  def set_state(self, state: Mapping[str, int]) -> None:
    """Restores a state from `get_state` (e.g. read back from a checkpoint's JSON)."""
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
      raise KeyError(f"data iterator state is missing {missing}; expected keys {STATE_KEYS}")
    if int(state["seed"]) != self._state["seed"]:
      raise ValueError(f"state seed={state['seed']} differs from the iterator's seed="
                       f"{self._state['seed']}; build the iterator with the same seed")
    if not 0 <= int(state["index"]) <= len(self._source):
      raise ValueError(f"state index={state['index']} is outside [0, {len(self._source)}]: "
                       "the state belongs to a different dataset")
    self._state = {k: int(state[k]) for k in STATE_KEYS}
    self._accepted_in_epoch = 1  # unknown after a restore; only guards the all-skipped case

  def precheck(self) -> dict[str, int]:
    """`precheck(source, example_fn)` for this iterator's source."""
    return precheck(self._source, self._example_fn)

  def __iter__(self):
    return self

  def _next_epoch(self) -> None:
    if self._accepted_in_epoch == 0:
      raise ValueError(f"every one of the {len(self._source)} records was skipped; check "
                       "max lengths and the truncation policy")
    self._state["epoch"] += 1
    self._state["index"] = 0
    self._accepted_in_epoch = 0

  def __next__(self) -> dict[str, Any]:
    batcher = self._make_batcher()
    while True:
      st = self._state
      if st["index"] >= len(self._source):
        self._next_epoch()
        continue
      if self._num_epochs is not None and st["epoch"] >= self._num_epochs:
        raise StopIteration
      rec_index = int(self._perm(st["epoch"])[st["index"]])
      try:
        example = self._example_fn(self._source[rec_index], rec_index)
      except batching.SkipExample as e:
        st["skipped"] += 1
        st["index"] += 1
        logging.debug("skipped record %d: %s", rec_index, e)
        continue
      if not batcher.add(example):
        if batcher.empty():
          raise ValueError(f"record {rec_index} does not fit in an empty batch")
        return batcher.emit()
      st["index"] += 1
      self._accepted_in_epoch += 1
      if batcher.full():
        return batcher.emit()


def precheck(source: Sequence[Any], example_fn: Callable[[Any, int], dict]) -> dict[str, int]:
  """Runs `example_fn` over every record once, before training, so that a bad record
  raises now rather than mid-epoch. Returns {"records", "skipped"}; raises the first error."""
  skipped = 0
  for i in range(len(source)):
    try:
      example_fn(source[i], i)
    except batching.SkipExample:
      skipped += 1
  if skipped == len(source):
    raise ValueError(f"every one of the {len(source)} records would be skipped; check max "
                     "lengths and the truncation policy")
  return {"records": len(source), "skipped": skipped}


def _iterator(source, example_fn, batcher, *, seed, shuffle, num_epochs) -> DataIterator:
  return DataIterator(source, example_fn=example_fn, make_batcher=batcher, seed=seed,
                      shuffle=shuffle, num_epochs=num_epochs)


def prompt_batches(source, tok: Tokenizer, *, batch_size: int, max_prompt_length: int,
                   truncation: str = "error", seed: int = 0, shuffle: bool = True,
                   num_epochs: int | None = None, **example_kwargs) -> DataIterator:
  """RL prompts: batches {"prompt_ids", "prompt_mask" [B, P] left-padded, "prompt", "answer"}."""
  fn = batching.make_prompt_example_fn(tok, max_prompt_length=max_prompt_length,
                                       truncation=truncation, **example_kwargs)
  collate = lambda exs: batching.collate_prompts(exs, pad_id=tok.pad_id,  # noqa: E731
                                                 max_prompt_length=max_prompt_length)
  return _iterator(source, fn, lambda: batching.Batcher(batch_size, collate), seed=seed,
                   shuffle=shuffle, num_epochs=num_epochs)


def sft_batches(source, tok: Tokenizer, *, batch_size: int, max_length: int,
                truncation: str = "error", pack: bool = False,
                buckets: Sequence[int] | None = None, seed: int = 0,
                shuffle: bool = True, num_epochs: int | None = None,
                **example_kwargs) -> DataIterator:
  """SFT batches [B, T]; with `pack=True` several examples share a row (see `Packer`);
  with `buckets` (unpacked only) T is the smallest bucket that holds the batch."""
  if pack and buckets:
    raise ValueError("buckets and pack=True are exclusive: packed rows are max_length long")
  fn = batching.make_sft_example_fn(tok, max_length=max_length, truncation=truncation,
                                    **example_kwargs)
  if pack:
    make = lambda: batching.Packer(batch_size, max_length=max_length,  # noqa: E731
                                   pad_id=tok.pad_id)
  else:
    collate = lambda exs: batching.collate_sft(exs, pad_id=tok.pad_id,  # noqa: E731
                                               max_length=max_length, buckets=buckets)
    make = lambda: batching.Batcher(batch_size, collate)  # noqa: E731
  return _iterator(source, fn, make, seed=seed, shuffle=shuffle, num_epochs=num_epochs)


def preference_batches(source, tok: Tokenizer, *, batch_size: int, max_prompt_length: int,
                       max_length: int, truncation: str = "error", seed: int = 0,
                       shuffle: bool = True, num_epochs: int | None = None,
                       **example_kwargs) -> DataIterator:
  """Preference batches: chosen_*/rejected_* [B, T] (prompt + response, loss on response)."""
  fn = batching.make_preference_example_fn(tok, max_prompt_length=max_prompt_length,
                                           max_length=max_length, truncation=truncation,
                                           **example_kwargs)
  collate = lambda exs: batching.collate_preference(exs, pad_id=tok.pad_id,  # noqa: E731
                                                    max_length=max_length)
  return _iterator(source, fn, lambda: batching.Batcher(batch_size, collate), seed=seed,
                   shuffle=shuffle, num_epochs=num_epochs)


def grain_batches(source: Sequence[Any], *, example_fn: Callable[[Any, int], dict],
                  collate: Callable[[list[dict]], dict[str, Any]], batch_size: int,
                  seed: int = 0, shuffle: bool = True, num_epochs: int | None = None):
  """The same examples through grain: `MapDataset.source(...).shuffle(seed).repeat(...)
  .map(...).filter(...).to_iter_dataset().batch(...)`.

  Returns a grain `IterDataset`; `iter(ds)` has JSON-serialisable `get_state()` /
  `set_state()`. Skipped examples are dropped by `filter` but not counted (use
  `DataIterator` for the count). Shuffling differs from `DataIterator`'s: grain's own.
  Packing is not supported here.
  """
  import grain  # pylint: disable=import-outside-toplevel
  if len(source) == 0:
    raise ValueError("source is empty: the data iterator needs at least one record")
  n = len(source)

  def convert(index, record):
    try:
      return example_fn(record, index % n)
    except batching.SkipExample:
      return None

  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs).map_with_index(convert).filter(lambda ex: ex is not None)
  return ds.to_iter_dataset().batch(batch_size, drop_remainder=True, batch_fn=collate)
