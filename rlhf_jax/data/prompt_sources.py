"""Prompt dataset rows: JSONL / Parquet / prepared TFDS readers, and record validation.

Each reader returns a `Table`: the rows as (where, fields) pairs, where `where` locates the
row for messages ("train.jsonl:12", "train.parquet row 3", "gsm8k:train[7]"), plus the
column names when the format has a schema (Parquet, TFDS). Field values are plain Python:
TFDS `bytes` are decoded as UTF-8 (mocked TFDS data already gives `str`), numpy scalars
and arrays become Python numbers and lists.

`records` validates the rows against the configured field names (`Fields`) and maps them
to {"prompt", "answer", "_origin", **other fields}. A row that cannot be read or is invalid
goes to `Invalid.report`, which raises `DataFormatError` naming the row (file:line) and the
fix, or records it when invalid rows are skipped.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

from rlhf_jax.data import chat as chat_lib
from rlhf_jax.data import jsonl
from rlhf_jax.data.jsonl import DataFormatError

ORIGIN_KEY = "_origin"


class Row(NamedTuple):
  where: str
  fields: dict[str, Any]


class Table(NamedTuple):
  rows: list[Row]
  columns: tuple[str, ...] | None  # None: no schema (JSONL), checked row by row


class Fields(NamedTuple):
  """Which fields hold the prompt and the answer (`task.prompt_key`, `task.answer_key`)."""
  prompt_key: str = "prompt"
  answer_key: str = "answer"
  answer_required: bool = False  # answer_key was configured: every record must have it
  answer_format: str | None = None  # "final_number": keep the answer's final number


class Invalid:
  """Invalid rows: raised at once, or (with `skip=True`) counted as (where, reason)."""

  def __init__(self, skip: bool):
    self.skip = skip
    self.rows: list[tuple[str, str]] = []

  def report(self, where: str, reason: str) -> None:
    if not self.skip:
      raise DataFormatError(f"{where}: {reason}; fix the data, or set task.skip_invalid=True "
                            "to skip invalid records")
    self.rows.append((where, reason))

  def __len__(self) -> int:
    return len(self.rows)


def closest(name: str, choices: Iterable[str]) -> str:
  """' (did you mean 'x'?)' for the closest of `choices`, or ''."""
  match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
  return f" (did you mean {match[0]!r}?)" if match else ""


def check_file(path: Any, key: str) -> str:
  """The path of `task.<key>` if it is an existing file; FileNotFoundError /
  IsADirectoryError naming the key and the path otherwise."""
  if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
    raise ValueError(f"task.{key} must be a file path, got {path!r}")
  path = os.path.expanduser(os.fspath(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"task.{key}={path!r}: no such file (relative paths are "
                            f"resolved from {os.getcwd()!r}); fix task.{key}")
  if os.path.isdir(path):
    raise IsADirectoryError(f"task.{key}={path!r} is a directory; point task.{key} at a file")
  return path


def plain(value: Any) -> Any:
  """numpy / bytes values -> Python values; bytes that are not UTF-8 stay bytes."""
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError:
      return value
  if isinstance(value, np.ndarray):
    return plain(value.item()) if value.ndim == 0 else [plain(v) for v in value.tolist()]
  if isinstance(value, np.generic):
    return plain(value.item())
  if isinstance(value, dict):
    return {k: plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  return value


def read_jsonl(path: str, invalid: Invalid) -> Table:
  """One JSON object per line; blank lines are ignored."""
  rows = []
  for lineno, obj in jsonl.json_lines(path):
    where = f"{path}:{lineno}"
    if isinstance(obj, jsonl.DataFormatError):
      invalid.report(where, str(obj))
      continue
    if not isinstance(obj, dict):
      invalid.report(where, f"expected a JSON object, got {type(obj).__name__}")
      continue
    rows.append(Row(where, obj))
  return Table(rows, None)


def read_parquet(path: str, key: str) -> Table:
  """Every row of a Parquet file, read with pyarrow."""
  try:
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"reading task.{key}={path!r} (a Parquet file) needs pyarrow: "
                      "pip install pyarrow (or pip install 'rlhf_jax[parquet]')") from e
  try:
    table = pq.read_table(path)
  except Exception as e:  # pylint: disable=broad-except  # ArrowInvalid, OSError...
    raise ValueError(f"task.{key}={path!r} cannot be read as Parquet ({type(e).__name__}: "
                     f"{e})") from e
  rows = [Row(f"{path} row {i}", plain(r)) for i, r in enumerate(table.to_pylist())]
  return Table(rows, tuple(table.column_names))


def _tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    import tensorflow_datasets.text  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise ImportError("task.name='tfds' needs tensorflow-datasets: pip install "
                      "tensorflow-datasets") from e
  return tfds


def check_tfds_dataset(name: str) -> None:
  """ValueError naming the closest registered builder when `name` is not one."""
  tfds = _tfds()
  builder = name.split("/")[0].split(":")[0]
  builders = tfds.list_builders(with_community_datasets=False)
  if builder not in builders:
    raise ValueError(f"task.dataset={name!r}: TFDS has no dataset {builder!r}"
                     f"{closest(builder, builders)}; see tfds.list_builders()")


def read_tfds(name: str, split: str, data_dir: str | None, key: str) -> Table:
  """Every example of an already-prepared TFDS split (nothing is downloaded)."""
  tfds = _tfds()
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    n = len(source)
  except Exception as e:  # pylint: disable=broad-except  # not prepared, bad split...
    where = repr(data_dir) if data_dir else "the default data_dir"
    reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise ValueError(
        f"TFDS dataset {name!r} split {split!r} (task.{key}) cannot be read from {where} "
        f"without downloading ({type(e).__name__}: {reason}); prepare it first, where there "
        f"is network access, with `tfds build {name.split(':')[0]} "
        f"--file_format=array_record` and set task.data_dir to that data_dir") from e
  columns = None
  info = getattr(source, "dataset_info", None)
  if info is not None and getattr(info, "features", None) is not None:
    columns = tuple(info.features.keys())
  # One item at a time: the mocked source's batched `__getitems__` fails.
  rows = [Row(f"{name}:{split}[{i}]", plain(dict(source[i]))) for i in range(n)]
  return Table(rows, columns)


def check_columns(table: Table, source: str, spec: Fields) -> None:
  """ValueError when a schema lacks the prompt column (or a configured answer column)."""
  if table.columns is None:
    return
  keys = [("prompt_key", spec.prompt_key)]
  if spec.answer_required:
    keys.append(("answer_key", spec.answer_key))
  for setting, key in keys:
    if key not in table.columns:
      raise ValueError(f"{source} has no column {key!r} (task.{setting})"
                       f"{closest(key, table.columns)}; its columns: {list(table.columns)}")


def _prompt_problem(prompt: Any, key: str) -> str | None:
  if isinstance(prompt, str):
    return None
  if isinstance(prompt, bytes):
    return f"field {key!r} (task.prompt_key) is not valid UTF-8"
  if isinstance(prompt, list):
    try:
      chat_lib.validate_messages(prompt, where=f"field {key!r} (task.prompt_key)")
    except ValueError as e:
      return str(e)
    return None
  shown = "null" if prompt is None else f"{type(prompt).__name__} {prompt!r:.40}"
  return (f"field {key!r} (task.prompt_key) holds {shown}; expected a string or a list of "
          "chat messages [{'role': ..., 'content': ...}]")


def _answer(value: Any, spec: Fields) -> tuple[str | None, str | None]:
  """(answer, problem)."""
  if isinstance(value, str):
    pass
  elif isinstance(value, (int, float)) and not isinstance(value, bool):
    value = str(value)
  else:
    shown = "bytes that are not UTF-8" if isinstance(value, bytes) else type(value).__name__
    return None, (f"field {spec.answer_key!r} (task.answer_key) holds {shown}; expected a "
                  "string or a number")
  if spec.answer_format == "final_number":
    from rlhf_jax.data import tfds_source  # pylint: disable=import-outside-toplevel
    final = tfds_source.gsm8k_final_answer(value)
    value = final if final is not None else value.strip()
  return value, None


def _record(row: Row, spec: Fields, invalid: Invalid) -> dict | None:
  """A validated record without prompt_ids, or None when the row is skipped."""
  fields = row.fields
  if spec.prompt_key not in fields:
    invalid.report(row.where, f"no field {spec.prompt_key!r} (task.prompt_key)"
                   f"{closest(spec.prompt_key, fields)}; the record has fields "
                   f"{sorted(fields)}")
    return None
  prompt = fields[spec.prompt_key]
  problem = _prompt_problem(prompt, spec.prompt_key)
  answer = fields.get(spec.answer_key)
  if problem is None and answer is not None:
    answer, problem = _answer(answer, spec)
  elif problem is None and spec.answer_required:
    problem = (f"no value for {spec.answer_key!r} (task.answer_key); the record has fields "
               f"{sorted(k for k, v in fields.items() if v is not None)}")
  if problem is not None:
    invalid.report(row.where, problem)
    return None
  out = {k: v for k, v in fields.items() if k not in (spec.prompt_key, spec.answer_key)}
  out.update({"prompt": prompt, "answer": answer, ORIGIN_KEY: row.where})
  return out


def records(table: Table, source: str, spec: Fields, invalid: Invalid) -> list[dict]:
  """The table's valid rows as {"prompt", "answer", "_origin", **other fields}; an empty
  result raises `DataFormatError` naming `source`."""
  check_columns(table, source, spec)
  out = [r for r in (_record(row, spec, invalid) for row in table.rows) if r is not None]
  if not out:
    skipped = summarise(invalid.rows)
    raise DataFormatError(f"{source}: the dataset has no records"
                          + (f" ({skipped})" if skipped else ""))
  return out


def summarise(skipped: Sequence[tuple[str, str]]) -> str:
  """'N invalid record(s) skipped; first: where: reason' or ''."""
  if not skipped:
    return ""
  return f"{len(skipped)} invalid record(s) skipped; first: {skipped[0][0]}: {skipped[0][1]}"
