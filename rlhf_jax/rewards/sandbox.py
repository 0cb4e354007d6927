"""Code-execution reward whose passes the untrusted code cannot forge (Linux).

`run_tests(code, tests)` runs the untrusted `code` alone in a *worker* process
(new network, PID, mount, IPC, UTS namespaces; read-only file system with
private tmpfs as its directory and on /tmp, /var/tmp, /dev/shm unless the interpreter
lives there; no capabilities; rlimits) and the
`tests` in a *judge* process where each name the solution defines is a proxy:
calls, attributes, items, iteration, `len` and arithmetic are forwarded to the
worker, whose results come back as plain data or as proxies of other objects
(which never equal plain data). Asserts and comparisons run in the judge, which
never sends the expected values, and it signs each result with a per-run HMAC
key; the parent counts only authentic results. Guarantees, limits and the
tests rule (each top-level `assert` is a test; without any, each top-level
expression statement such as `check(candidate)` is) are in
docs/reliability.md, "Code-execution sandbox".
"""


import ast
import builtins
import ctypes
import errno
import hmac
import importlib
import json
import math
import operator
import os
import resource
import secrets
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple, Optional

_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp"}
_FORBIDDEN = {errno.EPERM, errno.EACCES, errno.EROFS, errno.EFBIG, errno.EMFILE, errno.EAGAIN,
              errno.ENETUNREACH, errno.ENETDOWN, errno.EADDRNOTAVAIL}
_BINOPS = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or",
           "xor", "lshift", "rshift")


class SandboxResult(NamedTuple):
  """Outcome of `run_tests`; limits hit are flags here, never exceptions."""
  score: float             # passed / total (0.0 without tests)
  passed: int              # tests the judge saw pass
  total: int               # tests in the tests source
  timeout: bool            # wall-clock or CPU-time limit hit
  memory: bool             # MemoryError (address-space limit) seen
  forbidden: bool          # an operation the sandbox refuses (network, write, fork, file size)
  network_isolated: bool   # the worker ran in its own network namespace
  error: Optional[str]     # first error: the solution's, a test's, timeout, ...


def split_tests(tests: str) -> list:
  """[(top-level statement, is_test)] by the tests rule of the module docstring."""
  body = ast.parse(tests).body
  if any(isinstance(s, ast.Assert) for s in body):
    return [(s, isinstance(s, ast.Assert)) for s in body]
  return [(s, isinstance(s, ast.Expr) and not isinstance(s.value, ast.Constant)) for s in body]


# ----------------------------------------------------------------------------- wire format

def _enc(x, ref, depth=0):
  """Plain data -> JSON-able value (containers tagged); anything else -> `ref(x)`."""
  if x is None:
    return None
  for t in (bool, int, float, str):
    if isinstance(x, t):
      return t(x)
  e = lambda v: _enc(v, ref, depth + 1)  # noqa: E731
  if depth > 100:
    return ref(x)
  if isinstance(x, list):
    return [e(v) for v in x]
  for t, tag in ((tuple, "t"), (frozenset, "f"), (set, "s")):
    if isinstance(x, t):
      return {tag: [e(v) for v in x]}
  if isinstance(x, dict):
    return {"d": [[e(k), e(v)] for k, v in x.items()]}
  if isinstance(x, (bytes, bytearray)):
    return {"b": bytes(x).hex()}
  if isinstance(x, complex):
    return {"c": [x.real, x.imag]}
  if type(x).__module__ == "numpy" and hasattr(x, "tolist"):
    return e(x.tolist())
  return ref(x)


def _hook(deref):
  """json object_hook undoing `_enc`'s tags; `deref(handle, is_module)` resolves a proxy."""
  def hook(o):
    (k, v), = o.items()
    if k in ("h", "m") and type(v) is int:
      return deref(v, k == "m")
    if k == "b" and type(v) is str:
      return bytes.fromhex(v)
    if type(v) is not list:
      raise ValueError("bad tag")
    if k == "c" and all(type(p) in (int, float) for p in v):
      return complex(*v)
    return {"t": tuple, "s": set, "f": frozenset, "d": dict}[k](v)
  return hook


def _wait(fd, write, deadline):
  poll = select.poll()      # (not select: the parent's pipe numbers may exceed FD_SETSIZE)
  poll.register(fd, select.POLLOUT if write else select.POLLIN)
  if not poll.poll(None if deadline is None else max(0.0, deadline - time.monotonic()) * 1e3):
    raise TimeoutError("timeout")


def _send(fd, obj, deadline=None):
  data = json.dumps(obj, separators=(",", ":")).encode()
  data = struct.pack(">I", len(data)) + data
  while data:           # <= PIPE_BUF bytes per write never block once select says writable
    _wait(fd, True, deadline)
    data = data[os.write(fd, data[:4096 if deadline else 1 << 20]):]


def _read(fd, n, deadline):
  buf = bytearray()
  while len(buf) < n:
    _wait(fd, False, deadline)
    chunk = os.read(fd, min(n - len(buf), 1 << 20))
    if not chunk:
      raise EOFError("the solution process exited")
    buf += chunk
  return buf


def _recv(fd, hook, deadline=None):
  n, = struct.unpack(">I", _read(fd, 4, deadline))
  if n > 16 << 20:
    raise ValueError("message too large")
  return json.loads(_read(fd, n, deadline), object_hook=hook)


# ----------------------------------------------------------------------------- isolation

_libc = ctypes.CDLL(None, use_errno=True)


def _unshare() -> str:
  """Namespaces for the worker's children: "root", "user" or "" (none available)."""
  flags = 0x40000000 | 0x20000000 | 0x20000 | 0x8000000 | 0x4000000   # NET PID NS IPC UTS
  uid, gid = os.getuid(), os.getgid()
  if uid == 0 and _libc.unshare(flags) == 0:
    return "root"
  if _libc.unshare(flags | 0x10000000) != 0:                  # + CLONE_NEWUSER
    return ""
  for name, text in (("setgroups", "deny"), ("uid_map", f"1000 {uid} 1"),
                     ("gid_map", f"1000 {gid} 1")):
    with open(f"/proc/self/{name}", "w") as f:
      f.write(text)
  return "user"


def _covered(d: str) -> bool:
  """Whether a private tmpfs may cover `d`: not when the interpreter (a virtualenv under
  /tmp, say) or its import path lives there."""
  need = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                        os.path.dirname(sys.executable), *sys.path) if p}
  return os.path.isdir(d) and not any(p == d or p.startswith(d + "/") for p in need)


def _mount_private_fs(workdir: str) -> bool:
  """Everything read-only; a private tmpfs as the worker's directory `workdir`, and on
  /tmp, /var/tmp, /dev/shm unless the interpreter lives there; own (or no) /proc.

  Returns whether the file system is read-only and /proc shows only the namespace."""
  _libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None)    # MS_REC | MS_PRIVATE
  attr = (ctypes.c_uint64 * 4)(0x1 | 0x2 | 0x4, 0, 0, 0)      # MOUNT_ATTR_RDONLY|NOSUID|NODEV
  ok = _libc.syscall(442, -100, b"/", 0x8000, attr, 32) == 0  # mount_setattr(AT_RECURSIVE)
  tmpfs = lambda d, size: _libc.mount(b"tmpfs", d.encode(), b"tmpfs", 0x2 | 0x4,  # noqa: E731
                                      f"size={size},nr_inodes=4096,mode=1777".encode())
  for d in ("/tmp", "/var/tmp", "/dev/shm"):
    if _covered(d):
      tmpfs(d, "64m")
  os.makedirs(workdir, exist_ok=True)  # on the new tmpfs when it covered the parent's /tmp
  ok = tmpfs(workdir, "64m") == 0 and ok
  return (_libc.mount(b"proc", b"/proc", b"proc", 0x2 | 0x4 | 0x8, None) == 0
          or _libc.mount(b"tmpfs", b"/proc", b"tmpfs", 0x2 | 0x4 | 0x8, b"size=1m") == 0) and ok


def _setrlimit(lim, soft, hard=None):
  top = resource.getrlimit(lim)[1]
  resource.setrlimit(lim, tuple(v if top == resource.RLIM_INFINITY else min(v, top)
                                for v in (soft, soft if hard is None else hard)))


def _limit_and_drop(cfg, ns):
  """Worker set-up before any untrusted code: cwd, rlimits, no capabilities."""
  os.chdir(cfg["workdir"])
  cpu = int(math.ceil(cfg["timeout_s"])) + 1
  _setrlimit(resource.RLIMIT_CPU, cpu, cpu + 1)
  for lim, v in ((resource.RLIMIT_AS, cfg["memory_mb"] << 20), (resource.RLIMIT_CORE, 0),
                 (resource.RLIMIT_NPROC, cfg["max_procs"]),
                 (resource.RLIMIT_NOFILE, cfg["max_open_files"]),
                 (resource.RLIMIT_FSIZE, cfg["max_file_mb"] << 20)):
    _setrlimit(lim, v)
  if os.getuid() == 0:     # a fresh uid: its own process count, no signals to other users
    os.setgroups([])
    _libc.prctl(8, 1, 0, 0, 0)                                # PR_SET_KEEPCAPS
    os.setresgid(*[cfg["uid"]] * 3)
    os.setresuid(*[cfg["uid"]] * 3)
  caps = 1 << 2 if os.getuid() == cfg["uid"] else 0           # CAP_DAC_READ_SEARCH, or none
  _libc.capset((ctypes.c_uint32 * 2)(0x20080522, 0),            # _LINUX_CAPABILITY_VERSION_3
               (ctypes.c_uint32 * 6)(caps, caps, caps, 0, 0, 0))
  _libc.prctl(47, 2, 2, 0, 0)                                 # keep it across exec (ambient)
  _libc.prctl(38, 1, 0, 0, 0)                                 # PR_SET_NO_NEW_PRIVS


def _exit_with(status):
  code = os.waitstatus_to_exitcode(status)
  os._exit(code if code >= 0 else 128 - code)


def _child_main(cfg):
  """Outer process: namespaces, then an init process (if any), then the worker."""
  ns = _unshare()
  os.write(cfg["status_fd"], json.dumps({"ns": ns}).encode())
  os.close(cfg["status_fd"])
  if os.fork() == 0:
    if ns:
      _libc.prctl(1, signal.SIGKILL, 0, 0, 0)                 # PR_SET_PDEATHSIG: die with us
      _libc.prctl(4, 0, 0, 0, 0)                              # PR_SET_DUMPABLE 0
      signal.signal(signal.SIGINT, signal.SIG_DFL)            # init ignores in-namespace signals
      if not _mount_private_fs(cfg["workdir"]) and ns == "user":   # (as root the fresh uid protects the rest)
        os._exit(71)
      worker = os.fork()
    if not ns or worker == 0:
      _worker(cfg, ns)
    os.close(cfg["req_fd"])
    os.close(cfg["rep_fd"])
    while True:            # init reaps until the worker ends, and its exit ends the namespace
      pid, status = os.wait()
      if pid == worker:
        _exit_with(status)
  os.close(cfg["req_fd"])
  os.close(cfg["rep_fd"])
  _exit_with(os.wait()[1])


# ----------------------------------------------------------------------------- worker

def _big(v):
  """Whether a global is too large (or cannot be sent) to go to the judge as data."""
  try:
    return len(json.dumps(_enc(v, lambda _: 0))) > 1 << 20
  except Exception:  # pylint: disable=broad-except
    return True


def _worker(cfg, ns):
  """Serves the judge's requests on the solution's objects (all of this is untrusted)."""
  try:
    _limit_and_drop(cfg, ns)
  except BaseException:  # pylint: disable=broad-except
    os._exit(70)
  objs, ids = [], {}
  sys.set_int_max_str_digits(100_000)      # results such as factorial(2000) travel as JSON

  def ref(x):
    if id(x) not in ids:
      ids[id(x)] = len(objs)
      objs.append(x)
    return {"m" if isinstance(x, type(builtins)) else "h": ids[id(x)]}

  ops = {"call": lambda f, *a, **k: f(*a, **k), "len": len, "iter": iter, "next": next,
         "bool": bool, "repr": repr, "str": str, "isinstance": isinstance, "int": int,
         "float": float, "abs": abs, "getattr": getattr, "setattr": setattr, "delattr": delattr}
  ops.update((n, getattr(operator, n + "_" if n in ("and", "or") else n)) for n in _BINOPS + (
      "getitem", "setitem", "delitem", "index", "neg", "pos", "invert", "eq", "ne", "lt", "le",
      "gt", "ge"))
  g = {"__name__": "__main__", "__builtins__": builtins}
  hook = _hook(lambda h, _: objs[h])
  while True:
    try:
      op, args, kw = _recv(cfg["req_fd"], hook)
    except BaseException:  # pylint: disable=broad-except
      os._exit(0)
    try:
      if op == "load":
        exec(compile(args[0], "<solution>", "exec", dont_inherit=True), g)  # pylint: disable=W0122
        reply = ["v", {"d": [[k, ref(v) if _big(v) else _enc(v, ref)] for k, v in list(g.items())
                             if not k.startswith("__")]}, []]
      else:
        v = ops[op](*args, **dict(kw))
        back = [_enc(a, ref) if op == "call" and isinstance(a, (list, dict, set)) else None
                for a in args]
        reply = ["v", _enc(v, ref), back]
    except BaseException as e:  # pylint: disable=broad-except
      try:
        reply = ["e", type(e).__name__, str(e)[:300], getattr(e, "errno", None)]
      except BaseException:  # pylint: disable=broad-except
        reply = ["e", "Exception", "", None]
    try:
      _send(cfg["rep_fd"], reply)
    except (TypeError, ValueError, RecursionError):           # not encodable; nothing sent yet
      _send(cfg["rep_fd"], ["e", "ValueError", "the result cannot be sent", None])
    except BaseException:  # pylint: disable=broad-except
      os._exit(0)


# ----------------------------------------------------------------------------- judge

class _Broken(BaseException):
  """The worker exited, timed out or broke the protocol: no later test can pass."""


class _Remote:
  """Judge-side proxy of an object in the worker."""
  __slots__ = ("_h",)
  chan = None

  def __init__(self, h):
    object.__setattr__(self, "_h", h)

  def __getattr__(self, name):
    if name.startswith("__") or name == "_h":
      raise AttributeError(name)
    return _rpc("getattr", self, name)

  def __iter__(self):
    it = _rpc("iter", self)
    return it if isinstance(it, _Remote) else iter(it)

  def __hash__(self):
    return hash((_Remote, self._h))


class _RemoteModule(_Remote):
  """Proxy of a module the solution bound to a global name."""
  __slots__ = ()


def _text(e):
  try:
    return f"{type(e).__name__}: {str(e)[:200]}"
  except BaseException:  # pylint: disable=broad-except
    return type(e).__name__


def _exports(names):
  """The solution's globals as the tests see them: builtins are never shadowed, and a name
  bound to a module that names a standard module (or np / pd) is the real module."""
  out = {}
  for k, v in names.items():
    if type(k) is not str or k.startswith("__") or hasattr(builtins, k):
      continue
    mod = {"np": "numpy", "pd": "pandas"}.get(k, k)
    if isinstance(v, _RemoteModule) and (mod in sys.stdlib_module_names or mod != k):
      try:
        v = importlib.import_module(mod)
      except ImportError:
        pass
    out[k] = v
  return out


def _method(op, kind=None):
  """A forwarding dunder; `kind`: the type the result must have, "cmp" or "rev"."""
  def method(self, *args, **kwargs):
    if kind == "cmp" and not isinstance(args[0], _Remote):
      return NotImplemented      # a solution object never equals (or orders with) plain data
    v = _rpc(op, args[0], self) if kind == "rev" else _rpc(op, self, *args, **kwargs)
    if isinstance(kind, type) and type(v) is not kind:
      raise TypeError(f"{op}() of a solution object returned {type(v).__name__}")
    return v
  return method


for _op in ("setattr", "delattr", "call", "getitem", "setitem", "delitem", "next", "neg", "pos",
            "abs", "invert") + _BINOPS:
  setattr(_Remote, f"__{_op}__", _method(_op))
for _op in _BINOPS + ("isinstance",):
  setattr(_Remote, f"__r{_op}__" if _op != "isinstance" else "__instancecheck__",
          _method(_op, "rev"))
for _op in ("eq", "ne", "lt", "le", "gt", "ge"):
  setattr(_Remote, f"__{_op}__", _method(_op, "cmp"))
for _op, _t in (("len", int), ("bool", bool), ("str", str), ("repr", str), ("int", int),
                ("float", float), ("index", int)):
  setattr(_Remote, f"__{_op}__", _method(_op, _t))


def _no_ref(x):
  if isinstance(x, _Remote):
    return {"h": x._h}
  raise TypeError(f"a {type(x).__name__} cannot be passed to the solution (plain data only)")


def _rpc(op, *args, **kwargs):
  """`op` applied in the worker: plain data or a proxy back, or its exception raised."""
  c = _Remote.chan
  if c["broken"]:
    raise _Broken(c["broken"])
  msg = [op, [_enc(a, _no_ref) for a in args], [[k, _enc(v, _no_ref)] for k, v in kwargs.items()]]
  try:
    _send(c["req"], msg, c["deadline"])
    kind, value, extra, *rest = _recv(c["rep"], c["hook"], c["deadline"])
    if kind not in ("v", "e") or kind == "v" and type(extra) is not list:
      raise ValueError("bad reply")
  except Exception as e:  # pylint: disable=broad-except
    c["broken"] = "timeout" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"
    raise _Broken(c["broken"]) from None
  if kind == "v":
    for a, b in zip(args, extra):    # copy back arguments the solution mutated
      if type(a) is list and type(b) is list:
        a[:] = b
      elif type(a) in (dict, set) and type(b) is type(a):
        a.clear()
        a.update(b)
    return value
  c["memory"] |= value == "MemoryError"
  c["forbidden"] |= bool(rest) and type(rest[0]) is int and rest[0] in _FORBIDDEN
  t = getattr(builtins, value, None) if type(value) is str else None
  try:
    exc = t(str(extra)) if isinstance(t, type) and issubclass(t, Exception) else None
  except Exception:  # pylint: disable=broad-except
    exc = None
  raise exc or RuntimeError(f"{value}: {extra}")


def _judge_main(cfg):
  """Runs the tests against proxies; writes HMAC-signed records to stdout."""
  _libc.prctl(4, 0, 0, 0, 0)                                  # PR_SET_DUMPABLE 0
  _setrlimit(resource.RLIMIT_AS, (cfg["memory_mb"] + 1024) << 20)
  sys.set_int_max_str_digits(100_000)
  inp = json.loads(sys.stdin.buffer.read())
  key, out, null = bytes.fromhex(inp["key"]), os.dup(1), os.open(os.devnull, os.O_RDWR)
  for fd in (0, 1, 2):
    os.dup2(null, fd)

  def report(**rec):
    payload = json.dumps(rec).encode()
    os.write(out, payload + b" " + hmac.new(key, payload, "sha256").hexdigest().encode() + b"\n")

  remotes = {}
  c = _Remote.chan = {"req": cfg["req_fd"], "rep": cfg["rep_fd"], "broken": None,
                      "memory": False, "forbidden": False,
                      "deadline": time.monotonic() + cfg["timeout_s"],
                      "hook": _hook(lambda h, m: remotes.setdefault(
                          (h, m), (_RemoteModule if m else _Remote)(h)))}
  ns, err, i, loaded = {"__name__": "__main__", "__builtins__": builtins}, None, 0, False
  try:
    ns.update(_exports(_rpc("load", inp["code"])))
    loaded = True
  except BaseException as e:  # pylint: disable=broad-except
    err = f"solution: {_text(e)}"
  for node, is_test in split_tests(inp["tests"]):
    ok = False
    if loaded and not c["broken"]:
      try:
        exec(compile(ast.Module([node], []), "<tests>", "exec"), ns)  # pylint: disable=W0122
        ok = True
      except BaseException as e:  # pylint: disable=broad-except
        err = err or f"test {i}: {_text(e)}"
    if is_test:
      report(k="test", i=i, ok=ok)
      i += 1
  report(k="done", n=i, timeout=c["broken"] == "timeout", memory=c["memory"],
         forbidden=c["forbidden"], error=c["broken"] or err)


# ----------------------------------------------------------------------------- parent

def _kill(proc):
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def _records(out, key, total):
  """(passed, "done" record or None) from the authentic records, in order."""
  passed, seen, done = 0, 0, None
  for line in out.splitlines():
    payload, _, mac = line.rpartition(b" ")
    if done is not None or not hmac.compare_digest(
        mac, hmac.new(key, payload, "sha256").hexdigest().encode()):
      continue
    rec = json.loads(payload)
    if rec["k"] == "test" and rec["i"] == seen < total:
      passed, seen = passed + (rec["ok"] is True), seen + 1
    elif rec["k"] == "done" and rec["n"] == seen == total:
      done = rec
  return passed, done


def run_tests(code: str, tests: str, *, timeout_s: float = 5.0, memory_mb: int = 1024,
              max_procs: int = 64, max_open_files: int = 256,
              max_file_mb: int = 16) -> SandboxResult:
  """Run `tests` against `code` in the sandbox; what the code does never raises here.

  Args:
    code, tests: the untrusted solution and the tests (Python source).
    timeout_s: wall-clock limit for loading the solution and all tests (CPU time:
      ceil(timeout_s) + 1 s); tests seen passing before it still count.
    memory_mb: address-space limit of the solution process.
    max_procs, max_open_files, max_file_mb: further limits of the solution.

  Returns:
    `SandboxResult` with `score` = passed / total.
  """
  for name, v in (("timeout_s", timeout_s), ("memory_mb", memory_mb), ("max_procs", max_procs),
                  ("max_open_files", max_open_files), ("max_file_mb", max_file_mb)):
    if not v > 0:
      raise ValueError(f"run_tests: {name} must be > 0, got {v}")
  try:
    total = sum(t for _, t in split_tests(tests))
  except (SyntaxError, ValueError) as e:
    return SandboxResult(0.0, 0, 0, False, False, False, False, f"tests do not parse: {e}")
  if not total:
    return SandboxResult(0.0, 0, 0, False, False, False, False, "no tests found")
  key, cmd = secrets.token_bytes(32), [sys.executable, "-I", os.path.abspath(__file__)]
  with tempfile.TemporaryDirectory(prefix="rlhf_sandbox_") as tmp:
    os.chmod(tmp, 0o777)          # the worker's cwd (as a fresh uid) when there are no namespaces
    (req_r, req_w), (rep_r, rep_w), (st_r, st_w) = os.pipe(), os.pipe(), os.pipe()
    cfg = {"timeout_s": timeout_s, "memory_mb": int(memory_mb), "max_procs": int(max_procs),
           "max_open_files": int(max_open_files), "max_file_mb": int(max_file_mb),
           "workdir": tmp, "uid": 0x40000000 + secrets.randbelow(0x3fffff00),
           "req_fd": req_r, "rep_fd": rep_w, "status_fd": st_w}
    kw = dict(cwd=tmp, env=dict(_ENV, HOME=tmp, TMPDIR=tmp), start_new_session=True,
              stderr=subprocess.DEVNULL)
    child = judge = None
    try:
      child = subprocess.Popen(cmd + ["child", json.dumps(cfg)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, pass_fds=(req_r, rep_w, st_w), **kw)
      judge = subprocess.Popen(cmd + ["judge", json.dumps(dict(cfg, req_fd=req_w, rep_fd=rep_r))],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               pass_fds=(req_w, rep_r), **kw)
    finally:
      for fd in (req_r, req_w, rep_r, rep_w, st_w):
        os.close(fd)
      if judge is None:             # could not start: a host problem, raised to the caller
        os.close(st_r)
        if child is not None:
          _kill(child)
          child.wait()
    inp = json.dumps({"key": key.hex(), "code": code, "tests": tests}).encode()
    try:
      out, backstop = judge.communicate(inp, timeout=2 * timeout_s + 10)[0], False
    except subprocess.TimeoutExpired:
      _kill(judge)
      out, backstop = judge.communicate()[0], True
    passed, done = _records(out, key, total)
    done = done or {"error": "the judge did not finish", "timeout": backstop}
    try:
      child.wait(timeout=0 if done["timeout"] else 1.0)   # its status names CPU / file limits
    except subprocess.TimeoutExpired:
      pass
    _kill(child)
    _kill(judge)
    rc = child.wait()
    os.set_blocking(st_r, False)
    try:
      status = os.read(st_r, 4096)
    except BlockingIOError:
      status = b""
    os.close(st_r)
  try:
    isolated = json.loads(status)["ns"] in ("root", "user")
  except (ValueError, KeyError, TypeError):
    isolated = False
  sig = rc - 128 if rc > 128 else -rc
  error = ({70: "sandbox set-up failed (limits, uid or capabilities)",
            71: "sandbox set-up failed (no read-only file system or private /proc)"}.get(rc)
           or done["error"] or
           (f"solution process ended with status {rc}" if rc not in (0, -signal.SIGKILL) else None))
  return SandboxResult(passed / total, passed, total,
                       bool(done["timeout"] or sig == signal.SIGXCPU), bool(done.get("memory")),
                       bool(done.get("forbidden") or sig == signal.SIGXFSZ), isolated,
                       None if error is None else str(error)[:500])


if __name__ == "__main__":
  {"child": _child_main, "judge": _judge_main}[sys.argv[1]](json.loads(sys.argv[2]))
