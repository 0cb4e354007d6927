"""TFDS datasets read without TensorFlow: `tfds.data_source` (ArrayRecord) + record mapping.

Only already-prepared data can be read (nothing is downloaded). Text features arrive as
`bytes` from real data and as `str` under `tfds.testing.mock_data`; both are accepted.
Items are fetched one index at a time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Record = dict[str, Any]


def to_text(value: Any, *, field: str = "value") -> str:
  """bytes/str/numpy scalar -> str."""
  if hasattr(value, "item") and not isinstance(value, (bytes, str)):
    value = value.item()
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, str):
    return value
  raise TypeError(f"field '{field}': expected text (bytes or str), got {type(value).__name__}")


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def gsm8k_final_answer(text: str) -> str | None:
  """The number after '####' if present, else the last number in `text` (commas removed)."""
  if "####" in text:
    text = text.split("####")[-1]
  found = _NUMBER.findall(text)
  if not found:
    return None
  ans = found[-1].replace(",", "")
  return ans[:-2] if ans.endswith(".0") else ans


def gsm8k_score(prompt: str, completion: str, *, answer: str) -> float:
  """1.0 iff the completion's final number equals the reference final answer."""
  del prompt
  got = gsm8k_final_answer(completion)
  ref = gsm8k_final_answer(answer)
  return float(got is not None and ref is not None and got == ref)


def gsm8k_record(ex: Mapping[str, Any]) -> Record:
  """gsm8k example -> {"prompt", "answer" (final number), "solution" (worked answer)}."""
  question = to_text(ex["question"], field="question")
  solution = to_text(ex["answer"], field="answer")
  final = gsm8k_final_answer(solution)
  return {"prompt": question, "answer": final if final is not None else solution.strip(),
          "solution": solution}


RECORD_FNS: dict[str, Callable[[Mapping[str, Any]], Record]] = {"gsm8k": gsm8k_record}


class TfdsSource(Sequence):
  """A random-access sequence of records over `tfds.data_source(name, split=...)`.

  Args:
    name: TFDS builder name (e.g. "gsm8k"); text builders are registered on import.
    split: e.g. "train", "test", "train[:1000]".
    record_fn: maps a raw example to a record; defaults to `RECORD_FNS[name]`.
    data_dir: where the prepared data lives (default: TFDS's default).
  """

  def __init__(self, name: str, *, split: str = "train",
               record_fn: Callable[[Mapping[str, Any]], Record] | None = None,
               data_dir: str | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    import tensorflow_datasets.text  # pylint: disable=import-outside-toplevel,unused-import
    if record_fn is None:
      if name not in RECORD_FNS:
        raise ValueError(f"no record mapping for TFDS dataset {name!r}; pass record_fn=... "
                         f"(built in: {sorted(RECORD_FNS)})")
      record_fn = RECORD_FNS[name]
    builders = tfds.list_builders(with_community_datasets=False)
    if name not in builders:
      raise ValueError(f"TFDS has no builder {name!r}")
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:  # missing prepared data, bad split...
      raise ValueError(f"cannot open TFDS dataset {name!r} split {split!r} without "
                       f"downloading ({type(e).__name__}: {e}); prepare it first with "
                       f"`tfds build {name}` on a machine with network access") from e
    self.name, self.split, self._record_fn = name, split, record_fn

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    return self._record_fn(self._source[int(i)])
