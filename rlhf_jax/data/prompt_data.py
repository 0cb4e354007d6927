"""Prompt datasets for online RL: JSONL, Parquet and TFDS, named by a `task` config block.

    {"name": "jsonl",   "path": "train.jsonl", "eval_path": "test.jsonl",
     "prompt_key": "prompt", "answer_key": "answer"}
    {"name": "parquet", "path": "train.parquet", ...the same keys}
    {"name": "tfds",    "dataset": "gsm8k", "split": "train", "eval_split": "test",
     "prompt_key": "question", "answer_key": "answer"}

Optional keys (None means the default):

* `eval_fraction` (0.1): without `eval_path` / `eval_split`, this fraction of the training
  records is held out for evaluation, chosen by `seed`.
* `chat_template` (auto): True renders string prompts as one user message with the
  tokenizer's chat template (auto: True iff the tokenizer has one); False encodes them as
  text. Prompts that are lists of chat messages are always rendered with the template.
* `skip_invalid` (False): skip invalid records (not UTF-8, not JSON, missing or mistyped
  fields, unencodable) instead of raising; they are counted in `PromptData.skipped`.
* `answer_format` (None): "final_number" keeps only the number after '####' (or the last
  number) of the answer, e.g. for GSM8K's worked solutions.
* `data_dir` (tfds only): where the prepared data lives.

`prompt_key` holds a string or a list of chat messages [{"role", "content"}]. Each record
becomes {"prompt": as in the data, "prompt_ids": list[int], "answer": str | None,
"_origin": "file:line", **every other field}. `answer_key` defaults to "answer" (None
where a record has none); a configured `answer_key` must be in every record. Prompts longer
than `max_prompt_length` tokens are dropped (never truncated) and counted.

`prompt_batches` turns records (these, or synthetic-task records {"prompt", "answer"}) into
a resumable, shuffled stream of fixed-shape numpy batches (`pipeline.DataIterator`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import numpy as np

from rlhf_jax.data import batching
from rlhf_jax.data import prompt_sources as sources
from rlhf_jax.data.jsonl import DataFormatError
from rlhf_jax.data.pipeline import DataIterator
from rlhf_jax.data.tokenizer import Tokenizer, pad_sequences

DATASET_TASKS = ("jsonl", "parquet", "tfds")
ANSWER_FORMATS = ("final_number",)
ORIGIN_KEY = sources.ORIGIN_KEY
_COMMON_KEYS = frozenset({"name", "prompt_key", "answer_key", "eval_fraction", "chat_template",
                          "skip_invalid", "answer_format", "verifier"})
TASK_KEYS = {
    "jsonl": _COMMON_KEYS | {"path", "eval_path"},
    "parquet": _COMMON_KEYS | {"path", "eval_path"},
    "tfds": _COMMON_KEYS | {"dataset", "split", "eval_split", "data_dir"},
}
_REQUIRED = {"jsonl": ("path", "a .jsonl file"), "parquet": ("path", "a .parquet file"),
             "tfds": ("dataset", "a TFDS dataset name such as 'gsm8k'")}
_HOLD_OUT_STREAM = 104729  # numpy seed-sequence word that keeps the split apart from shuffles


@dataclasses.dataclass
class PromptData:
  """Loaded prompt records.

  Attributes:
    train / eval: records {"prompt", "prompt_ids", "answer", "_origin", **other fields}.
    total: training records read (after the held-out split, before length drops).
    dropped: training records dropped as longer than max_prompt_length.
    message: "dropped N of M prompts longer than data.max_prompt_length=L tokens" ("" when
      nothing was dropped), for the caller to log once.
    source / eval_source: where the records came from (path, or tfds "name:split").
    eval_dropped: held-out records dropped as too long.
    skipped: invalid records skipped (`task.skip_invalid=True`), training and held-out.
  """
  train: list[dict]
  eval: list[dict]
  total: int
  dropped: int
  message: str
  source: str
  eval_source: str = ""
  eval_dropped: int = 0
  skipped: int = 0


@dataclasses.dataclass(frozen=True)
class _Spec:
  name: str
  fields: sources.Fields
  eval_fraction: float | None
  chat_template: bool | None
  skip_invalid: bool
  path: str | None = None
  eval_path: str | None = None
  dataset: str | None = None
  split: str = "train"
  eval_split: str | None = None
  data_dir: str | None = None


def _as_dict(task_cfg) -> dict[str, Any]:
  if hasattr(task_cfg, "to_dict"):  # ml_collections.ConfigDict
    return dict(task_cfg.to_dict())
  if isinstance(task_cfg, Mapping):
    return dict(task_cfg)
  raise TypeError(f"config.task must be a mapping, got {type(task_cfg).__name__}")


def is_dataset_task(task_cfg: Mapping) -> bool:
  """True iff `task_cfg["name"]` is one of `DATASET_TASKS` (read by `load_prompt_data`)."""
  return _as_dict(task_cfg or {}).get("name") in DATASET_TASKS


def _check_type(cfg, key, types, what, default=None):
  value = cfg.get(key)
  if value is None:
    return default
  if not isinstance(value, types) or isinstance(value, bool) != (bool in types):
    raise ValueError(f"task.{key} must be {what}, got {value!r}")
  return value


def _parse(task_cfg) -> _Spec:
  """Validates the task block; every config error is raised here."""
  cfg = _as_dict(task_cfg)
  name = cfg.get("name")
  if name not in DATASET_TASKS:
    raise ValueError(f"task.name={name!r} is not a dataset task: load_prompt_data reads "
                     f"{DATASET_TASKS}{sources.closest(str(name), DATASET_TASKS)}; synthetic "
                     "tasks are built by data.make_task")
  known = TASK_KEYS[name]
  unknown = sorted(set(cfg) - known)
  if unknown:
    raise ValueError(f"task.{unknown[0]} is not a key of {name!r} tasks"
                     f"{sources.closest(unknown[0], known)}; known keys: {sorted(known)}")
  required, hint = _REQUIRED[name]
  if not cfg.get(required):
    raise ValueError(f"task.{required} is required for task.name={name!r}: {hint}")
  prompt_key = _check_type(cfg, "prompt_key", (str,), "a field name", "prompt")
  answer_key = _check_type(cfg, "answer_key", (str,), "a field name")
  if not prompt_key or answer_key == "":
    raise ValueError("task.prompt_key and task.answer_key must be non-empty field names")
  if answer_key is not None and answer_key == prompt_key:
    raise ValueError(f"task.prompt_key and task.answer_key are both {prompt_key!r}")
  fraction = _check_type(cfg, "eval_fraction", (int, float), "a number in [0, 1)")
  if fraction is not None and not 0 <= fraction < 1:
    raise ValueError(f"task.eval_fraction must be in [0, 1), got {fraction!r}")
  eval_key = "eval_split" if name == "tfds" else "eval_path"
  if fraction is not None and cfg.get(eval_key) is not None:
    raise ValueError(f"task.eval_fraction and task.{eval_key} are exclusive: the held-out "
                     f"records come either from task.{eval_key} or from a fraction of the "
                     "training data")
  answer_format = cfg.get("answer_format")
  if answer_format is not None and answer_format not in ANSWER_FORMATS:
    raise ValueError(f"task.answer_format must be None or one of {ANSWER_FORMATS}, got "
                     f"{answer_format!r}")
  for key in ("split", "eval_split", "data_dir", "dataset"):
    _check_type(cfg, key, (str,), "a string")
  return _Spec(
      name=name,
      fields=sources.Fields(prompt_key=prompt_key, answer_key=answer_key or "answer",
                            answer_required=answer_key is not None,
                            answer_format=answer_format),
      eval_fraction=fraction,
      chat_template=_check_type(cfg, "chat_template", (bool,), "True, False or None"),
      skip_invalid=_check_type(cfg, "skip_invalid", (bool,), "True or False", False),
      path=cfg.get("path"), eval_path=cfg.get("eval_path"),
      dataset=cfg.get("dataset"), split=cfg.get("split") or "train",
      eval_split=cfg.get("eval_split"), data_dir=cfg.get("data_dir"))


def _read(spec: _Spec, invalid: sources.Invalid):
  """((train_table, source), (eval_table, eval_source) or None); paths checked first."""
  if spec.name == "tfds":
    sources.check_tfds_dataset(spec.dataset)
    read = lambda split, key: (  # noqa: E731
        sources.read_tfds(spec.dataset, split, spec.data_dir, key), f"{spec.dataset}:{split}")
    train = read(spec.split, "split")
    return train, (read(spec.eval_split, "eval_split") if spec.eval_split else None)
  path = sources.check_file(spec.path, "path")
  eval_path = sources.check_file(spec.eval_path, "eval_path") if spec.eval_path else None
  if spec.name == "jsonl":
    read = lambda p, key: (sources.read_jsonl(p, invalid), p)  # noqa: E731
  else:
    read = lambda p, key: (sources.read_parquet(p, key), p)  # noqa: E731
  return read(path, "path"), (read(eval_path, "eval_path") if eval_path else None)


def _use_chat(spec: _Spec, tokenizer: Tokenizer) -> bool:
  has_template = bool(getattr(tokenizer, "chat_template", None))
  if spec.chat_template and not has_template:
    raise ValueError(f"task.chat_template=True but the tokenizer ({type(tokenizer).__name__}) "
                     "has no chat template; use a tokenizer with one or set "
                     "task.chat_template=False")
  return has_template if spec.chat_template is None else spec.chat_template


def _encode(records: list[dict], tokenizer: Tokenizer, use_chat: bool,
            invalid: sources.Invalid) -> list[dict]:
  out = []
  for rec in records:
    prompt = rec["prompt"]
    if isinstance(prompt, list) and not getattr(tokenizer, "chat_template", None):
      raise ValueError(f"{rec[ORIGIN_KEY]}: the prompt is a list of chat messages but the "
                       f"tokenizer ({type(tokenizer).__name__}) has no chat template to render "
                       "it; use a tokenizer with a chat template (config.tokenizer)")
    try:
      ids = batching.encode_prompt(tokenizer, prompt, chat=use_chat or isinstance(prompt, list))
    except (ValueError, TypeError, jinja2.TemplateError) as e:
      invalid.report(rec[ORIGIN_KEY], f"cannot encode the prompt ({type(e).__name__}: {e})")
      continue
    if not ids:
      invalid.report(rec[ORIGIN_KEY], "the prompt encodes to no tokens")
      continue
    out.append({**rec, "prompt_ids": [int(t) for t in ids]})
  return out


def _drop_long(records: list[dict], limit: int, what: str) -> list[dict]:
  kept = [r for r in records if len(r["prompt_ids"]) <= limit]
  if records and not kept:
    lengths = [len(r["prompt_ids"]) for r in records]
    raise ValueError(f"every one of the {len(records)} prompts in {what} is longer than "
                     f"data.max_prompt_length={limit} tokens (shortest {min(lengths)}, longest "
                     f"{max(lengths)}); raise data.max_prompt_length to at least {min(lengths)}")
  return kept


def _hold_out(records: list[dict], fraction: float, seed: int, source: str):
  """(train, held_out): a seeded random `fraction` of the records, both in file order."""
  n = len(records)
  k = 0 if fraction == 0 or n < 2 else max(1, int(round(n * fraction)))
  if k >= n:
    raise ValueError(f"task.eval_fraction={fraction} holds out all {n} records of {source}; "
                     "lower it or give held-out data")
  held = set(np.random.default_rng([int(seed), _HOLD_OUT_STREAM]).permutation(n)[:k].tolist())
  return ([r for i, r in enumerate(records) if i not in held],
          [r for i, r in enumerate(records) if i in held])


def load_prompt_data(task_cfg: Mapping, tokenizer: Tokenizer, *, max_prompt_length: int,
                     seed: int, eval_size: int | None = None) -> PromptData:
  """Reads, validates and tokenises the prompt dataset named by `task_cfg`.

  Args:
    task_cfg: the `task` block (see the module docstring).
    tokenizer: encodes the prompts (with its chat template when one is used).
    max_prompt_length: longer prompts are dropped and counted, never truncated.
    seed: chooses the held-out records when `task.eval_fraction` applies.
    eval_size: keep at most this many held-out records (the first ones, in file order).

  Raises (before anything is returned) ValueError / FileNotFoundError / IsADirectoryError /
  ImportError naming the task key or the file (and line) and the fix; `DataFormatError`
  (a ValueError) for invalid records unless `task.skip_invalid`.
  """
  spec = _parse(task_cfg)
  if int(max_prompt_length) < 1:
    raise ValueError(f"data.max_prompt_length must be >= 1, got {max_prompt_length}")
  if eval_size is not None and int(eval_size) < 0:
    raise ValueError(f"eval_size must be >= 0, got {eval_size}")
  use_chat = _use_chat(spec, tokenizer)
  invalid = sources.Invalid(spec.skip_invalid)
  (table, source), held = _read(spec, invalid)
  train = sources.records(table, source, spec.fields, invalid)
  if held is not None:
    eval_source = held[1]
    held_out = sources.records(held[0], eval_source, spec.fields, invalid)
  else:
    fraction = 0.1 if spec.eval_fraction is None else float(spec.eval_fraction)
    eval_source = f"{source} (held-out eval_fraction={fraction})"
    train, held_out = _hold_out(train, fraction, seed, source)
  train = _encode(train, tokenizer, use_chat, invalid)
  held_out = _encode(held_out, tokenizer, use_chat, invalid)
  if not train:
    raise DataFormatError(f"{source}: no prompt could be encoded "
                          f"({sources.summarise(invalid.rows)})")
  total, n_eval = len(train), len(held_out)
  train = _drop_long(train, int(max_prompt_length), source)
  held_out = _drop_long(held_out, int(max_prompt_length), eval_source)
  dropped, eval_dropped = total - len(train), n_eval - len(held_out)
  message = ""
  if dropped or eval_dropped:
    message = (f"dropped {dropped} of {total} prompts longer than data.max_prompt_length="
               f"{int(max_prompt_length)} tokens")
    if eval_dropped:
      message += f" (and {eval_dropped} of {n_eval} held-out prompts)"
  if invalid.rows:
    logging.warning("%s: %s", source, sources.summarise(invalid.rows))
  if eval_size is not None:
    held_out = held_out[:int(eval_size)]
  return PromptData(train=train, eval=held_out, total=total, dropped=dropped, message=message,
                    source=source, eval_source=eval_source, eval_dropped=eval_dropped,
                    skipped=len(invalid.rows))


def _describe(record: Mapping[str, Any], index: int) -> str:
  origin = record.get(ORIGIN_KEY) if isinstance(record, Mapping) else None
  prompt = record.get("prompt") if isinstance(record, Mapping) else record
  return f"record {index}" + (f" ({origin})" if origin else "") + f" (prompt {str(prompt)!r:.50})"


def _prompt_ids(tokenizer: Tokenizer, record: Mapping[str, Any], index: int,
                length: int) -> list[int]:
  ids = record.get("prompt_ids")
  if ids is None:
    ids = batching.encode_prompt(tokenizer, record["prompt"], chat="auto")
  ids = [int(t) for t in ids]
  if len(ids) > length:
    raise ValueError(f"{_describe(record, index)} has {len(ids)} prompt tokens, more than "
                     f"data.max_prompt_length={length}; raise it (load_prompt_data drops such "
                     "prompts)")
  return ids


def _answer_ids(tokenizer: Tokenizer, record: Mapping[str, Any], index: int,
                length: int) -> list[int]:
  answer = record.get("answer")
  if answer is None:
    return []
  answer = answer if isinstance(answer, str) else str(answer)
  ids = list(tokenizer.encode(answer))
  if len(ids) + 1 > length:
    raise ValueError(
        f"{_describe(record, index)}: answer {answer!r:.60} has {len(ids) + 1} tokens with EOS, "
        f"more than sampling.max_new_tokens={length}; exact-match verifiers need each answer "
        "plus EOS within sampling.max_new_tokens: raise it or shorten the answers "
        "(task.answer_format='final_number' keeps only an answer's final number)")
  return ids


class _Encoded:
  """Token ids of every record, encoded (and length-checked) once; `batch(indices)` pads."""

  def __init__(self, records, tokenizer, prompt_length, answer_length):
    self.pad_id, self.prompt_length, self.answer_length = (tokenizer.pad_id, prompt_length,
                                                           answer_length)
    self.prompts = [_prompt_ids(tokenizer, r, i, prompt_length) for i, r in enumerate(records)]
    self.answers = None if answer_length is None else [
        _answer_ids(tokenizer, r, i, answer_length) for i, r in enumerate(records)]

  def batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    ids, mask = pad_sequences([self.prompts[i] for i in indices], length=self.prompt_length,
                              pad_id=self.pad_id, padding_side="left")
    out = {"prompt_ids": ids, "prompt_mask": mask.astype(bool),
           "record_index": np.asarray(indices, dtype=np.int32)}
    if self.answers is not None:
      aids, amask = pad_sequences([self.answers[i] for i in indices], length=self.answer_length,
                                  pad_id=self.pad_id)
      out.update(answer_ids=aids, answer_mask=amask.astype(bool))
    return out


def prompt_arrays(records: Sequence[dict], tokenizer: Tokenizer, *, prompt_length: int,
                  answer_length: int | None = None) -> dict[str, np.ndarray]:
  """Every record, in order, as one batch of `prompt_batches`' arrays (e.g. for evaluation)."""
  return _Encoded(records, tokenizer, prompt_length, answer_length).batch(range(len(records)))


def prompt_batches(records: Sequence[dict], tokenizer: Tokenizer, *, batch_size: int,
                   prompt_length: int, seed: int,
                   answer_length: int | None = None) -> DataIterator:
  """A shuffled, endless, resumable stream of prompt batches over `records`.

  Records are `load_prompt_data` records, or synthetic-task records {"prompt", "answer"}
  (string prompts encoded as text, as `train.build.encode_prompts` does; chat-message lists
  with the tokenizer's template). Every record is encoded and checked here, once.

  Batches (numpy): `prompt_ids` [B, P] int32 left-padded with `tokenizer.pad_id`,
  `prompt_mask` [B, P] bool, `record_index` [B] int32 (index into `records`, e.g. to look
  up fields for reward functions) and, with `answer_length`, `answer_ids` [B, A] int32
  right-padded (the answer's tokens, no EOS; a missing answer is all padding) and
  `answer_mask` [B, A] bool. The order is `DataIterator`'s (numpy `default_rng([seed,
  epoch])` permutation per epoch); `get_state()` / `set_state()` resume it exactly.
  """
  if len(records) == 0:
    raise ValueError("prompt_batches needs at least one record")
  encoded = _Encoded(records, tokenizer, prompt_length, answer_length)
  collate = lambda examples: encoded.batch([e["record_index"] for e in examples])  # noqa: E731
  return DataIterator(records, example_fn=lambda record, index: {"record_index": index},
                      make_batcher=lambda: batching.Batcher(batch_size, collate), seed=seed)
