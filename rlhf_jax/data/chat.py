"""Chat-template rendering with the jinja2 environment Hugging Face templates expect.

Templates from `tokenizer_config.json` are jinja2 programs. They are rendered in an
`ImmutableSandboxedEnvironment` with `trim_blocks=True`, `lstrip_blocks=True`, the
`loopcontrols` extension, a `{% generation %}` block tag, the `tojson` filter (no HTML
escaping), and the globals `raise_exception`, `strftime_now`, `dict` and `namespace`,
matching `transformers`' `apply_chat_template`.

Besides the rendered text, `render_chat` returns the character spans of the assistant
turns, used to build loss masks that cover only what the assistant says.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

Message = Mapping[str, Any]
Span = tuple[int, int]

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class _GenerationTracker(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}`: records the character span of the body."""

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    call = self.call_method("_generation", [])
    return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

  def _generation(self, caller):
    # The body is rendered in place; a marker pair lets `render_chat` find its span.
    return _SPAN_OPEN + caller() + _SPAN_CLOSE


# Private-use code points never produced by a tokenizer's text; stripped after rendering.
_SPAN_OPEN = "\ue000"
_SPAN_CLOSE = "\ue001"


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                    separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
  """`namespace(...)` that refuses underscore-prefixed attributes (sandbox hygiene)."""

  def __init__(*args, **kwargs):  # pylint: disable=no-method-argument
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(
          f"chat templates cannot set underscore attributes on a namespace: {name!r}")


@functools.lru_cache(maxsize=32)
def compile_template(template: str) -> jinja2.Template:
  """Compiles a chat template in the transformers-compatible sandboxed environment."""
  if not isinstance(template, str) or not template:
    raise ValueError("chat_template must be a non-empty jinja2 string; set `chat_template` "
                     "in tokenizer_config.json or pass one explicitly.")
  env = ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[_GenerationTracker, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  env.globals["dict"] = dict
  env.globals["namespace"] = _Namespace
  return env.from_string(template)


def validate_messages(messages: Sequence[Message], *, where: str = "messages") -> None:
  """Raises ValueError unless `messages` is a non-empty list of {role: str, content: str}."""
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ValueError(f"{where}: expected a non-empty list of {{'role', 'content'}} dicts, "
                     f"got {type(messages).__name__} {messages!r:.80}")
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping):
      raise ValueError(f"{where}[{i}]: expected a dict with 'role' and 'content', got "
                       f"{type(m).__name__}")
    for key in ("role", "content"):
      if key not in m:
        raise ValueError(f"{where}[{i}]: missing field '{key}'")
      if not isinstance(m[key], str):
        raise ValueError(f"{where}[{i}].{key}: expected str, got {type(m[key]).__name__}")


def _render(template: str, messages, add_generation_prompt: bool, kwargs) -> str:
  # As transformers does: keys whose value is None are dropped from each message.
  messages = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
  return compile_template(template).render(
      messages=messages, tools=None, documents=None,
      add_generation_prompt=add_generation_prompt, **kwargs)


def _strip_markers(text: str) -> tuple[str, list[Span]]:
  spans, out, start, pos = [], [], None, 0
  for ch in text:
    if ch == _SPAN_OPEN:
      start = pos
    elif ch == _SPAN_CLOSE:
      spans.append((start, pos))
    else:
      out.append(ch)
      pos += 1
  return "".join(out), spans


def _prefix_spans(template, messages, kwargs) -> list[Span]:
  """Assistant spans from prefix renders: turn i spans render(:i+1) minus render(:i, gen prompt)."""
  spans = []
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    before = _render(template, messages[:i], True, kwargs) if i else ""
    upto = _render(template, messages[:i + 1], False, kwargs)
    if not upto.startswith(before):
      raise ValueError(
          "cannot locate assistant turns: the chat template does not render conversations "
          "prefix-consistently; add `{% generation %}...{% endgeneration %}` around the "
          "assistant content in the template.")
    spans.append((len(before), len(upto)))
  return spans


def render_chat(template: str, messages: Sequence[Message], *,
                add_generation_prompt: bool = False,
                special_tokens: Mapping[str, str] | None = None,
                **template_kwargs) -> tuple[str, list[Span]]:
  """Renders a conversation; returns (text, assistant character spans).

  The spans come from `{% generation %}` blocks when the template has them; otherwise turn i
  of the assistant spans `render(messages[:i+1])[len(render(messages[:i], gen_prompt)):]`,
  i.e. the assistant content plus the template's end-of-turn text.

  Args:
    template: jinja2 chat template.
    messages: list of {"role": str, "content": str} dicts.
    add_generation_prompt: append the header that opens an assistant turn.
    special_tokens: e.g. {"bos_token": "<s>", "eos_token": "</s>"}, visible to the template.
    **template_kwargs: other template variables (override `special_tokens`).
  """
  validate_messages(messages)
  kwargs = {**dict(special_tokens or {}), **template_kwargs}
  text = _render(template, messages, add_generation_prompt, kwargs)
  if _GENERATION_TAG.search(template):
    return _strip_markers(text)
  return text, _prefix_spans(template, list(messages), kwargs)


def render_chat_text(template: str, messages: Sequence[Message], **kwargs) -> str:
  """`render_chat` without the spans."""
  return render_chat(template, messages, **kwargs)[0]


def spans_to_token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> list[int]:
  """1 for every token whose characters overlap an assistant span, else 0."""
  mask = []
  for s, e in offsets:
    inside = any(s < b and (e > a if e > s else s >= a) for a, b in spans)
    mask.append(int(inside))
  return mask
