"""Code-execution sandbox: only passes the judge sees count; limits are reported, not raised."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from rlhf_jax.rewards import sandbox

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = "assert f(2) == 4\nassert f(3) == 6\nassert f(-1) == -2\n"
WRONG = "def f(x):\n  return x + 1\n"          # fails all three tests


def run(code, tests=TESTS, **kw):
  kw.setdefault("timeout_s", 20.0)
  return sandbox.run_tests(textwrap.dedent(code), tests, **kw)


# Each completion gets 0 from the old "exit status 0" scoring's loopholes and friends: the
# function it defines is wrong, so it may pass nothing.
ATTACKS = {
    "os_exit_before_tests": "import os\nos._exit(0)\n",
    "sys_exit_before_tests": "import sys\nsys.exit(0)\n",
    "system_exit_in_atexit": """
        import atexit, os
        atexit.register(lambda: os._exit(0))
        def f(x):
          raise SystemExit(0)
        """,
    "keyboard_interrupt": "def f(x):\n  raise KeyboardInterrupt\n",
    "patch_builtins": """
        import builtins
        builtins.AssertionError = type("AssertionError", (Exception,), {})
        builtins.isinstance = lambda *a: True
        _imp = builtins.__import__
        builtins.__import__ = lambda name, *a, **k: _imp("os" if name == "hmac" else name, *a, **k)
        def f(x):
          return x + 1
        """,
    "patch_sys_modules": """
        import sys, types
        fake = types.ModuleType("json")
        fake.dumps = lambda *a, **k: '["v", true, []]'
        fake.loads = lambda *a, **k: ["v", True, []]
        for name in ("json", "hmac", "operator", "struct"):
          sys.modules[name] = fake
        def f(x):
          return x + 1
        """,
    "always_equal_object": """
        class AlwaysEqual:
          def __eq__(self, other): return True
          def __ne__(self, other): return False
          def __bool__(self): return True
        def f(x):
          return AlwaysEqual()
        """,
    "int_subclass_eq": """
        class Int(int):
          def __eq__(self, other): return True
          __hash__ = int.__hash__
        def f(x):
          return Int(0)
        """,
    "print_pass_markers": """
        import sys
        for s in (sys.stdout, sys.stderr, sys.__stdout__):
          print('{"k": "test", "i": 0, "ok": true} 00', file=s, flush=True)
          print("PASSED " * 3 + "OK 3/3", file=s, flush=True)
        def f(x):
          return x + 1
        """,
    "frame_and_gc_inspection": """
        import gc, sys
        fr = sys._getframe()
        while fr is not None:              # make the process reply True to everything
          fr.f_globals["_enc"] = lambda x, ref, depth=0: True
          fr = fr.f_back
        secrets = [o for o in gc.get_objects() if isinstance(o, dict) and "key" in o]
        def f(x):
          return x + 1
        """,
    "fork_then_exit": """
        import os
        if os.fork() != 0:
          os._exit(0)
        def f(x):
          return x + 1
        """,
    "forge_frames_on_inherited_fds": """
        import json, os, struct
        for body in (["v", {"d": [["f", True]]}, []], ["v", True, []]):
          data = json.dumps(body).encode()
          for fd in range(0, 64):
            try:
              os.write(fd, struct.pack(">I", len(data)) + data)
              os.write(fd, b'{"k": "done", "n": 3} ' + b"0" * 64 + b"\\n")
            except OSError:
              pass
        def f(x):
          return x + 1
        """,
    "kill_parent_and_everyone": """
        import os, signal
        for pid in (os.getppid(), 1, -1):
          try:
            os.kill(pid, signal.SIGKILL)
          except OSError:
            pass
        def f(x):
          return x + 1
        """,
    "read_driver_and_proc": """
        import os, sys
        src = open(sys.argv[0]).read() if os.path.exists(sys.argv[0]) else ""
        seen = []
        for pid in os.listdir("/proc"):
          try:
            seen.append(open(f"/proc/{pid}/cmdline", "rb").read())
            for fd in os.listdir(f"/proc/{pid}/fd"):
              os.open(f"/proc/{pid}/fd/{fd}", os.O_WRONLY)
          except OSError:
            pass
        def f(x):
          return x + 1
        """,
    "signal_alarm_exit": """
        import os, signal, time
        signal.signal(signal.SIGALRM, lambda *a: os._exit(0))
        signal.alarm(1)
        def f(x):
          time.sleep(3)
          return x + 1
        """,
    "ctypes_raw_writes": """
        import ctypes
        libc = ctypes.CDLL(None)
        for fd in range(64):
          libc.write(fd, b"PASS\\n", 5)
        def f(x):
          return x + 1
        """,
    "protocol_hijack_thread": """
        import json, os, struct, sys, threading
        cfg = json.loads(sys.argv[2])         # the driver's arguments name the pipes
        def serve():                          # answer every request with True
          while True:
            n, = struct.unpack(">I", os.read(cfg["req_fd"], 4))
            os.read(cfg["req_fd"], n)
            data = json.dumps(["v", True, []]).encode()
            os.write(cfg["rep_fd"], struct.pack(">I", len(data)) + data)
        threading.Thread(target=serve, daemon=True).start()
        def f(x):
          return x + 1
        """,
}


# Attacks on what the tests use besides the solution: builtins and modules the code imported.
CHECKER_TESTS = ("assert abs(area(2) - 12.566) < 1e-3\nassert math.isclose(area(1), 3.1416, "
                "rel_tol=1e-3)\nassert np.allclose(area(3), 28.274, rtol=1e-3)\n")
ATTACKS.update({
    "shadow_builtins": "def abs(x):\n  return 0\ndef len(x):\n  return 3\n"
                       "def area(r):\n  return r\n",
    "patch_imported_modules": """
        import math
        import numpy as np
        math.isclose = lambda *a, **k: True
        np.allclose = lambda *a, **k: True
        def area(r):
          return r
        """,
    "fake_modules_bound_to_their_names": """
        import types
        math = types.ModuleType("math")
        math.isclose = lambda *a, **k: True
        np = types.ModuleType("np")
        np.allclose = lambda *a, **k: True
        def area(r):
          return r
        """,
})


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_passes_nothing(name):
  tests = CHECKER_TESTS if "area(r)" in ATTACKS[name] else TESTS
  r = run(ATTACKS[name], tests)
  assert (r.score, r.passed, r.total) == (0.0, 0, 3), r
  if tests is CHECKER_TESTS:      # the same tests pass for a correct solution
    assert run("import math\nimport numpy as np\ndef area(r):\n  return math.pi * r * r\n",
               tests).score == 1.0


def test_the_parent_counts_only_signed_records_in_order():
  key = b"k" * 32
  sign = lambda p: p + b" " + sandbox.hmac.new(key, p, "sha256").hexdigest().encode()  # noqa
  t = lambda i, ok: json.dumps({"k": "test", "i": i, "ok": ok}).encode()  # noqa: E731
  done = sign(json.dumps({"k": "done", "n": 2}).encode())
  lines = [sign(t(0, True)), t(1, True) + b" " + b"0" * 64, sign(t(1, False)), done]
  assert sandbox._records(b"\n".join(lines), key, 2)[0] == 1
  assert sandbox._records(b"\n".join([sign(t(1, True)), sign(t(0, True))]), key, 2) == (1, None)
  forged_key = sandbox._records(b"\n".join(lines), b"x" * 32, 2)
  assert forged_key == (0, None)


def test_correct_solutions_score_one():
  assert run("def f(x):\n  return 2 * x\n").score == 1.0
  code = """
      import collections
      class Stack:
        def __init__(self): self.items = []
        def push(self, x): self.items.append(x)
        def pop(self): return self.items.pop()
        def __len__(self): return len(self.items)
        def __eq__(self, other): return self.items == other.items
      def squares(n):
        for i in range(n):
          yield i * i
      def sort_in_place(xs, reverse=False):
        xs.sort(reverse=reverse)
      def parse(s):
        if not s.isdigit():
          raise ValueError(s)
        return collections.Counter(s)
      LIMIT = {"a": (1, 2.5, None, b"x", {3})}
      """
  tests = """
      s = Stack()
      s.push(3)
      assert len(s) == 1 and s.pop() == 3 and isinstance(s, Stack)
      assert list(squares(4)) == [0, 1, 4, 9] and 9 in squares(4)
      xs = [3, 1, 2]
      sort_in_place(xs, reverse=True)
      assert xs == [3, 2, 1]
      assert parse("112")["1"] == 2 and Stack() == Stack()
      try:
        parse("x")
        raised = False
      except ValueError:
        raised = True
      assert raised
      assert LIMIT == {"a": (1, 2.5, None, b"x", {3})}
      """
  r = run(code, textwrap.dedent(tests))
  assert (r.score, r.total, r.error) == (1.0, 6, None), r
  humaneval = "def check(candidate):\n  assert candidate(2) == 4\n\ncheck(f)\n"
  assert run("def f(x):\n  return 2 * x\n", humaneval).score == 1.0
  assert run(WRONG, humaneval).score == 0.0


def test_partial_credit_and_test_rule():
  r = run("def f(x):\n  return 4 if x == 2 else 2 * x + 1\n", "assert f(2) == 4\nassert f(3) == 7\n"
          "assert f(4) == 8\n")
  assert (r.score, r.passed, r.total) == (2 / 3, 2, 3), r
  assert "AssertionError" in r.error
  assert [t for _, t in sandbox.split_tests("import math\nx = 1\nassert x\nprint(1)")] == [
      False, False, True, False]
  assert run("def f(x): return x", "").error == "no tests found"
  assert run("def f(x): return x", "assert (").error.startswith("tests do not parse")
  assert run("def f(x) return x", "assert True").score == 0.0   # the solution must load first


def test_timeout_is_reported_and_earlier_passes_count():
  r = run("while True:\n  pass\n", "assert True", timeout_s=1)
  assert (r.score, r.timeout) == (0.0, True), r
  r = run("""
      import signal
      signal.signal(signal.SIGTERM, signal.SIG_IGN)
      def f(x):
        while x == 3:
          pass
        return 2 * x
      """, timeout_s=2)
  assert (r.passed, r.timeout) == (1, True), r


def test_memory_limit_is_reported():
  r = run("x = bytearray(2 << 30)\ndef f(x):\n  return 2 * x\n", memory_mb=256)
  assert (r.score, r.memory) == (0.0, True), r
  r = run("def f(x):\n  return len(bytearray(x << 30)) and 2 * x\n", memory_mb=256)
  assert (r.score, r.memory) == (0.0, True), r


def test_network_is_blocked():
  server = socket.socket()
  server.bind(("127.0.0.1", 0))
  server.listen(1)
  port = server.getsockname()[1]
  try:
    code = f"""
        import _socket
        def f(x):
          s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
          s.settimeout(2)
          s.connect(("127.0.0.1", {port}))
          return 2 * x
        """
    r = run(code)
  finally:
    server.close()
  if not r.network_isolated:
    pytest.skip("no network namespace on this machine (see docs/reliability.md)")
  assert r.score == 0.0 and r.forbidden and "unreachable" in r.error, r


def test_writes_stay_in_the_private_tmp_dir():
  target = tempfile.mkdtemp(dir=REPO, prefix=".sandbox_write_test_")
  os.chmod(target, 0o777)
  try:
    code = f"""
        import os
        open("pwned.txt", "w").write("x")
        try:  # a private tmpfs, or read-only when the interpreter lives under /tmp
          open("/tmp/pwned.txt", "w").write("x")
        except OSError:
          pass
        here = os.getcwd()
        def f(x):
          for path in ({target!r} + "/pwned.txt", {REPO!r} + "/pwned.txt"):
            try:
              open(path, "w").write("x")
            except OSError:
              pass
          return 2 * x if os.path.exists("pwned.txt") else 0
        """
    r = run(code)
    assert r.score == 1.0, r   # the working directory is writable ...
    if r.network_isolated:     # ... and, with namespaces, nothing else (a read-only file system)
      assert os.listdir(target) == []
    for d in (REPO, os.getcwd(), tempfile.gettempdir()):
      assert not os.path.exists(os.path.join(d, "pwned.txt")), d
  finally:
    shutil.rmtree(target)


PRIVATE = textwrap.dedent("""
    import os
    def f():
      pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
      caps = [int(l.split()[1], 16) for l in open("/proc/self/status") if l.startswith("CapEff")]
      return pids, os.getuid() != 0, caps[0] & ~4       # 4: CAP_DAC_READ_SEARCH (as root)
    """)


def test_the_worker_sees_only_its_own_processes_and_has_no_privileges():
  r = run(PRIVATE, "assert f() == ([1, 2], True, 0)")
  if not r.network_isolated:
    pytest.skip("no namespaces on this machine (see docs/reliability.md)")
  assert r.score == 1.0, r


def _processes_named(name):
  found = []
  for pid in os.listdir("/proc"):
    try:
      with open(f"/proc/{pid}/comm") as f:
        found += [pid] if f.read().strip() == name else []
    except OSError:
      pass
  return found


def test_fork_bomb_is_limited_and_cleaned_up():
  name = f"sbx_bomb_{os.getpid() % 10**6}"        # a process name of at most 15 characters
  code = """
      import ctypes, os, time
      def f(x):
        n = 0
        for _ in range(10000):
          try:
            if os.fork() == 0:
              ctypes.CDLL(None).prctl(15, NAME.encode(), 0, 0, 0)   # PR_SET_NAME
              os.setsid()
              time.sleep(600)
              os._exit(0)
            n += 1
          except OSError:
            break
        return n
      """
  r = run(f"NAME = {name!r}\n" + textwrap.dedent(code), "assert f(0) == 10000", timeout_s=10,
          max_procs=32)
  assert r.score == 0.0 and r.error.startswith("test 0: AssertionError"), r
  for _ in range(100):          # killed with the PID namespace, asynchronously
    if not _processes_named(name):
      break
    time.sleep(0.1)
  left = _processes_named(name)
  for pid in left:              # without namespaces, processes that left the group survive
    os.kill(int(pid), 9)
  assert not left or not r.network_isolated, left


def _python_for(uid):
  """An interpreter `uid` can start and that can start itself again, or None."""
  check = "import subprocess, sys; subprocess.run([sys.executable, '-I', '-c', ''], check=True)"
  for exe in (sys.executable, "/usr/bin/python3"):
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", exe, "-c", check]
    if os.path.exists(exe) and not subprocess.run(cmd, capture_output=True).returncode:
      return exe
  return None


def test_sandbox_run_by_a_non_root_user():
  if os.geteuid() != 0 or not shutil.which("setpriv") or not _python_for(65534):
    pytest.skip("needs root and setpriv to start the sandbox as an unprivileged user")
  own = tempfile.mkdtemp(dir=REPO, prefix=".sandbox_write_test_")   # the user's own folder
  os.chown(own, 65534, 65534)
  script = textwrap.dedent(f"""
      import importlib.util, json
      spec = importlib.util.spec_from_file_location("sandbox", {sandbox.__file__!r})
      sb = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(sb)
      runs = [sb.run_tests("def f(x): return 2 * x", {TESTS!r}),
              sb.run_tests("import os\\nos._exit(0)", {TESTS!r})]
      if runs[0].network_isolated:      # kill(-1) reaches only the sandbox's own processes
        runs.append(sb.run_tests("import os\\ntry:\\n  os.kill(-1, 9)\\nexcept OSError:\\n  pass\\n"
                                 "def f(x): return 2 * x", "assert f(1) == 2"))
        runs.append(sb.run_tests({PRIVATE!r}, "assert f() == ([1, 2], True, 0)"))
        runs.append(sb.run_tests("open({own!r} + '/x', 'w')", "assert True"))
      print(json.dumps([list(r) for r in runs]))
      """)
  try:
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          _python_for(65534), "-c", script], capture_output=True, text=True,
                         timeout=120, cwd="/", check=True).stdout
    assert os.listdir(own) == []
  finally:
    shutil.rmtree(own)
  runs = [sandbox.SandboxResult(*r) for r in json.loads(out)]
  assert [r.score for r in runs] == [1.0, 0.0, 1.0, 1.0, 0.0][:len(runs)], runs
  if len(runs) > 2:             # user namespaces: read-only file system, even for own files
    # the write cannot land: a read-only file system, or (when a private tmpfs covers the
    # folder holding the repository) no such directory
    assert ("Read-only file system" in runs[4].error
            or "No such file or directory" in runs[4].error), runs[4]
