"""A name -> function registry with declared interfaces (losses, estimators, rewards).

Each entry declares, when it is registered, what it is and what it consumes:

    @register("gae", family="token", needs=("values", "mask"))
    def gae(rewards, *, values, mask, gamma=1.0, lam=0.95): ...

`family` is the method's kind (e.g. "group", "token", "policy_gradient"), `needs` the
inputs a caller must provide by keyword (beyond the positional data), and `state` a
factory `state(group_size=G) -> (init, update)` for methods that keep state between
calls: the caller keeps `init()`, advances it with `update(state, rewards)` and passes
the result as `state=`. The hyper-parameters a config may set are
the remaining keyword-only parameters, recorded once at registration. Callers (the
training step) read `declaration(name)`; they never look at signatures themselves.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple


@dataclasses.dataclass(frozen=True)
class Declaration:
  """What a registered method is and what it consumes.

  name: the registry name.
  kind: the family ("group", "token", "policy_gradient", "preference", ...).
  needs: keyword inputs the caller must provide (e.g. "values", "mask", "group_size").
  state: for stateful methods, `state(group_size=G) -> (init, update)` (an optax-style
    pair; the caller passes `update(state, rewards)` as `state=`); None otherwise.
  hyperparameters: keyword parameters a config may set, with their defaults
    (`inspect.Parameter.empty` marks a required one).
  parameters: every parameter as (name, required), in order: what a caller that feeds
    inputs by name (the offline losses' batches) may pass.
  """
  name: str
  kind: str
  needs: Tuple[str, ...] = ()
  state: Optional[Callable[[], Any]] = None
  hyperparameters: Tuple[Tuple[str, Any], ...] = ()
  parameters: Tuple[Tuple[str, bool], ...] = ()

  @property
  def parameter_names(self) -> Tuple[str, ...]:
    return tuple(k for k, _ in self.parameters)

  @property
  def hyperparameter_names(self) -> Tuple[str, ...]:
    return tuple(k for k, _ in self.hyperparameters)

  @property
  def required_hyperparameters(self) -> Tuple[str, ...]:
    """Hyper-parameters without a default (a config must set them)."""
    return tuple(k for k, v in self.hyperparameters if v is inspect.Parameter.empty)

  def check_kwargs(self, kwargs: Mapping[str, Any], *, key: str) -> None:
    """Raises ValueError naming `key` when `kwargs` sets something not a hyper-parameter,
    or leaves out a hyper-parameter that has no default."""
    for k in kwargs:
      if k not in self.hyperparameter_names:
        close = difflib.get_close_matches(k, self.hyperparameter_names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{key} has {k!r}, which {self.name!r} does not take{hint}; it takes "
                         f"{list(self.hyperparameter_names)}")
    for k in self.required_hyperparameters:
      if k not in kwargs:
        raise ValueError(f"{self.name!r} needs {k!r} (it has no default); set it in {key}")


def _parameters(fn: Callable) -> Tuple[Tuple[str, bool], ...]:
  return tuple((name, p.default is inspect.Parameter.empty)
               for name, p in inspect.signature(fn).parameters.items()
               if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


def _hyperparameters(fn: Callable, needs: Tuple[str, ...]) -> Tuple[Tuple[str, Any], ...]:
  out = []
  for name, p in inspect.signature(fn).parameters.items():
    if p.kind == p.KEYWORD_ONLY and name not in needs and name != "state":
      out.append((name, p.default))
  return tuple(out)


class Registry:
  """Maps names to functions and their declarations.

  `get` raises a `KeyError` that lists the known names, so a typo in a config
  says what would have been accepted.
  """

  def __init__(self, kind: str):
    self.kind = kind
    self._fns: Dict[str, Callable] = {}
    self._decl: Dict[str, Declaration] = {}

  def register(self, name: str, family: str = "", *, needs: Iterable[str] = (),
               state: Optional[Callable[[], Any]] = None) -> Callable[[Callable], Callable]:
    needs = tuple(needs)

    def deco(fn: Callable) -> Callable:
      if name in self._fns and self._fns[name] is not fn:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._fns[name] = fn
      self._decl[name] = Declaration(name=name, kind=family, needs=needs, state=state,
                                     hyperparameters=_hyperparameters(fn, needs),
                                     parameters=_parameters(fn))
      return fn
    return deco

  def _unknown(self, name: str) -> KeyError:
    close = difflib.get_close_matches(str(name), list(self._fns), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return KeyError(f"unknown {self.kind} {name!r}{hint}; known {self.kind}s: "
                    f"{', '.join(sorted(self._fns))}")

  def get(self, name: str) -> Callable:
    try:
      return self._fns[name]
    except KeyError:
      raise self._unknown(name) from None

  def declaration(self, name: str) -> Declaration:
    try:
      return self._decl[name]
    except KeyError:
      raise self._unknown(name) from None

  def declaration_of(self, fn: Callable) -> Declaration:
    """The declaration of a registered function (looked up by identity)."""
    for name, f in self._fns.items():
      if f is fn:
        return self._decl[name]
    raise KeyError(f"{getattr(fn, '__name__', fn)!r} is not a registered {self.kind}; register "
                   f"it (e.g. `@register(name, family=...)`) to declare its inputs")

  def names(self, family: Optional[str] = None) -> Iterable[str]:
    return sorted(n for n in self._fns if family is None or self._decl[n].kind == family)

  def family(self, name: str) -> str:
    return self.declaration(name).kind

  def __contains__(self, name: str) -> bool:
    return name in self._fns
