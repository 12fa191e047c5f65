"""`Sandbox`: real child processes running real tool code under each limit, and nothing left running after.

The tool code below notes the pids of the processes it forks in files under the test's tmp dir (its outer pid,
from `/proc/self`, which is the host's /proc also inside the sandbox's pid namespace), so that the test can check
they are gone. Tests about processes run in both modes: with namespaces (where this machine allows them) and with
the child-subreaper sweep alone (what machines without user namespaces get).
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time

import pytest

from rlhf_engine.envs import sandbox
from rlhf_engine.envs.sandbox import Sandbox, SandboxLimits
from tests.helpers.waiting import wait_until

NOTE_PID = """
import os, time
def note_pid(name):
    with open(os.path.join({dir!r}, name + ".tmp"), "w") as f:
        f.write(os.readlink("/proc/self"))
    os.rename(os.path.join({dir!r}, name + ".tmp"), os.path.join({dir!r}, name))
def wait_for(name):
    while not os.path.exists(os.path.join({dir!r}, name)):
        time.sleep(0.01)
def noted():
    return [name for name in os.listdir({dir!r}) if not name.endswith(".tmp")]
"""


def tool(body: str, pid_dir) -> str:
    return NOTE_PID.format(dir=str(pid_dir)) + body


def noted_pids(pid_dir) -> dict[str, int]:
    return {name: int((pid_dir / name).read_text()) for name in os.listdir(pid_dir) if not name.endswith(".tmp")}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def assert_all_gone(pids: dict[str, int]) -> None:
    wait_until(lambda: not any(alive(pid) for pid in pids.values()), timeout_s=2,
               message=lambda: f"processes still alive: { {n: p for n, p in pids.items() if alive(p)} }")


@pytest.fixture(params=["namespaces", "subreaper"])
def mode(request, monkeypatch) -> str:
    """Run the test with namespaces (skipped where the OS refuses them) and without (the subreaper sweep only)."""
    if request.param == "namespaces" and not sandbox.namespaces_available():
        pytest.skip("no unprivileged user + pid + net namespaces on this machine")
    if request.param == "subreaper":
        monkeypatch.setattr(sandbox, "namespaces_available", lambda: False)
    return request.param


def test_ok_output():
    with Sandbox() as box:
        result = box.run_python("print(2+3)")
    assert (result.status, result.output, result.detail) == ("ok", "5\n", "")
    assert result.seconds > 0


def test_exception_is_an_error_with_its_traceback():
    with Sandbox() as box:
        result = box.run_python("def f():\n    raise ValueError('boom')\nf()\n")
        exited = box.run_python("import sys\nprint('bye')\nsys.exit(3)")
        high = box.run_python("import sys\nsys.exit(200)")
        signalled = box.run_python("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)")
    assert (result.status, result.detail) == ("error", "exit code 1")
    assert result.output.startswith("Traceback (most recent call last):\n")
    assert result.output.endswith("ValueError: boom\n")
    assert (exited.status, exited.output, exited.detail) == ("error", "bye\n", "exit code 3")
    assert (high.status, high.detail) == ("error", "exit code 200")
    assert (signalled.status, signalled.detail) == ("error", "killed by SIGTERM")


def test_stdin_is_passed():
    data = "hello" * 200_000  # 1 MB: more than a pipe holds, so it is fed while the tool reads
    with Sandbox() as box:
        result = box.run_python("import sys\ndata = sys.stdin.read()\nprint(len(data), data[:5].upper())", stdin=data)
        empty = box.run_python("import sys\nprint(repr(sys.stdin.read()))")
    assert (result.status, result.output) == ("ok", "1000000 HELLO\n")
    assert (empty.status, empty.output) == ("ok", "''\n")


def test_environment_is_minimal_and_cwd_fresh(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "do-not-leak")
    with Sandbox() as box:
        result = box.run_python("import os\nprint(sorted(os.environ))\nprint(os.listdir('.'))")
    assert (result.status, result.output) == ("ok", "['LANG', 'PATH']\n['tool.py']\n")


def test_busy_loop_hits_the_cpu_limit():
    with Sandbox(SandboxLimits(cpu_s=1, wall_s=10)) as box:
        result = box.run_python("while True: pass")
    assert (result.status, result.detail) == ("timeout", "CPU limit (1 s)")  # not the wall clock's
    assert result.seconds >= 1.0


def test_sleep_hits_the_wall_clock():
    with Sandbox(SandboxLimits(wall_s=1.0)) as box:
        result = box.run_python("import time\nprint('start', flush=True)\ntime.sleep(100)")
    assert (result.status, result.output, result.detail) == ("timeout", "start\n", "wall-clock limit (1.0 s)")
    assert 1.0 <= result.seconds < 30  # killed at its limit, long before the sleep's 100 s (wide: a loaded machine)


def test_cpu_limit_cannot_be_raised_by_the_tool():
    if not sandbox.namespaces_available() and os.geteuid() == 0:
        pytest.skip("root without a user namespace keeps CAP_SYS_RESOURCE and may raise its hard limits")
    code = ("import resource\n"
            "try:\n"
            "    resource.setrlimit(resource.RLIMIT_CPU, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n"
            "    print('raised', flush=True)\n"
            "except (ValueError, OSError) as e:\n"
            "    print('refused:', e, flush=True)\n"
            "while True: pass\n")
    with Sandbox(SandboxLimits(cpu_s=1, wall_s=10)) as box:
        result = box.run_python(code)
    assert (result.status, result.detail) == ("timeout", "CPU limit (1 s)")
    assert result.output.startswith("refused:")


def test_output_limit_cuts_and_kills():
    with Sandbox(SandboxLimits(output_bytes=1000, wall_s=10)) as box:
        flood = box.run_python("import sys\nsys.stdout.write('x' * 100_000_000)")
        exact = box.run_python("print('y' * 999)")  # 999 + newline: exactly the limit, kept whole
    assert (flood.status, flood.detail) == ("output_limit", "more than 1000 bytes of output")
    assert flood.output == "x" * 1000 + "\n[output truncated at 1000 bytes]"
    assert flood.seconds < 5  # killed at the limit, not at the wall clock
    assert (exact.status, exact.output) == ("ok", "y" * 999 + "\n")


def test_memory_limit_then_the_sandbox_still_works():
    with Sandbox(SandboxLimits(memory_bytes=256 << 20)) as box:
        result = box.run_python("x = bytearray(2 << 30)")
        after = box.run_python("print('fine')")
    assert (result.status, result.detail) == ("memory", f"memory limit ({256 << 20} bytes)")
    assert result.output.endswith("MemoryError\n")
    assert (after.status, after.output) == ("ok", "fine\n")


ESCAPES = {
    # a child of the tool
    "child": ("if os.fork() == 0:\n"
              "    note_pid('child')\n"
              "    time.sleep(100)\n"
              "    os._exit(0)\n"
              "wait_for('child')\n"
              "print('parent done')\n"),
    # a double-forked grandchild in a session of its own
    "grandchild": ("child = os.fork()\n"
                   "if child == 0:\n"
                   "    os.setsid()\n"
                   "    if os.fork() == 0:\n"
                   "        note_pid('grandchild')\n"
                   "        time.sleep(100)\n"
                   "    os._exit(0)\n"
                   "os.waitpid(child, 0)\n"
                   "wait_for('grandchild')\n"
                   "print('parent done')\n"),
}


@pytest.mark.parametrize("left", sorted(ESCAPES))
def test_processes_the_tool_leaves_running_are_killed(mode, tmp_path, left):
    with Sandbox(SandboxLimits(max_processes=4)) as box:
        result = box.run_python(tool(ESCAPES[left], tmp_path))
    assert (result.status, result.output) == ("ok", "parent done\n")
    pids = noted_pids(tmp_path)
    assert list(pids) == [left]
    assert_all_gone(pids)


def test_forks_past_max_processes_fail(mode):
    body = ("import errno, os, threading, time\n"
            "for i in range(4):\n"
            "    try:\n"
            "        pid = os.fork()\n"
            "    except BlockingIOError:\n"
            "        print(i, 'refused', flush=True)\n"
            "        continue\n"
            "    if pid == 0:\n"
            "        time.sleep(100)\n"
            "    print(i, 'forked', flush=True)\n"
            "thread = threading.Thread(target=print, args=('threads are not counted',))\n"
            "thread.start()\n"
            "thread.join()\n")
    with Sandbox(SandboxLimits(max_processes=3)) as box:
        result = box.run_python(body)
    with Sandbox() as box:
        single = box.run_python("import os\nos.fork()")  # the default, 1: no fork at all
    assert (result.status, result.output) == ("ok", "0 forked\n1 forked\n2 refused\n3 refused\n"
                                                    "threads are not counted\n")
    assert (single.status, single.detail) == ("error", "exit code 1")
    assert single.output.endswith("BlockingIOError: [Errno 11] Resource temporarily unavailable\n")


def test_a_fork_bomb_gets_max_processes_and_no_more(mode, tmp_path):
    # Every process forks in a loop of 6 (a child goes on with the loop, in a session of its own): 63 forks
    # unchecked, a bounded bomb; with max_processes=5 exactly 4 of them go ahead.
    body = ("original = os.getpid()\n"
            "for i in range(6):\n"
            "    try:\n"
            "        if os.fork() == 0:\n"
            "            os.setsid()\n"
            "            note_pid(f'p{os.getpid()}')\n"
            "    except BlockingIOError:\n"
            "        pass\n"
            "if os.getpid() != original:\n"
            "    time.sleep(100)\n"
            "while len(noted()) < 4:\n"
            "    time.sleep(0.01)\n"
            "print(len(noted()))\n")
    with Sandbox(SandboxLimits(max_processes=5)) as box:
        result = box.run_python(tool(body, tmp_path))
    assert (result.status, result.output) == ("ok", "4\n")
    pids = noted_pids(tmp_path)
    assert len(pids) == 4
    assert_all_gone(pids)


@pytest.mark.parametrize("network", [False, True])
def test_network(network):
    if not network and not sandbox.namespaces_available():
        pytest.skip("no unprivileged network namespace on this machine: network=False is best-effort here")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
        with Sandbox(SandboxLimits(network=network)) as box:
            result = box.run_python(code)
        if network:
            assert (result.status, result.output) == ("ok", "connected\n")
        else:
            assert (result.status, result.detail) == ("error", "exit code 1")
            assert result.output.endswith("OSError: [Errno 101] Network is unreachable\n")
            listener.setblocking(False)
            with pytest.raises(BlockingIOError):  # no connection reached the host's loopback
                listener.accept()


def test_at_most_max_concurrent_runs_at_once():
    code = "import time\nstart = time.time()\ntime.sleep(0.5)\nprint(start, time.time())"
    results = []
    with Sandbox(SandboxLimits(max_concurrent=2)) as box:
        threads = [threading.Thread(target=lambda: results.append(box.run_python(code))) for _ in range(4)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
    assert [r.status for r in results] == ["ok"] * 4
    spans = [tuple(map(float, r.output.split())) for r in results]
    overlaps = [sum(start <= t < end for start, end in spans) for t, _ in spans]
    assert max(overlaps) <= 2
    assert elapsed >= 1.0  # 4 runs of 0.5 s, 2 at a time


def test_close_ends_running_and_waiting_runs(mode, tmp_path):
    body = ("if os.fork() == 0:\n"
            "    note_pid('child')\n"
            "    time.sleep(100)\n"
            "note_pid('tool')\n"
            "time.sleep(100)\n")
    box = Sandbox(SandboxLimits(max_processes=4, max_concurrent=1, wall_s=30))
    results = {}
    running = threading.Thread(target=lambda: results.update(running=box.run_python(tool(body, tmp_path))))
    running.start()
    wait_until(lambda: {"tool", "child"} <= set(noted_pids(tmp_path)), timeout_s=5)
    waiting = threading.Thread(target=lambda: results.update(waiting=box.run_python("print('never')")))
    waiting.start()
    box.close()
    running.join(timeout=5)
    waiting.join(timeout=5)
    assert (results["running"].status, results["running"].detail) == ("failed", "sandbox closed")
    assert (results["waiting"].status, results["waiting"].detail) == ("failed", "sandbox closed")
    assert results["running"].seconds < 5
    assert_all_gone(noted_pids(tmp_path))
    later = box.run_python("print('no')")
    assert (later.status, later.detail) == ("failed", "sandbox closed")
    box.close()  # idempotent


def test_no_temp_dir_left_behind(monkeypatch, tmp_path):
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    read_only = "import os\nos.makedirs('a/b')\nopen('a/b/f', 'w').write('x')\nos.chmod('a/b', 0o500)\nos.chmod('a', 0o500)"
    with Sandbox(SandboxLimits(wall_s=1.0)) as box:
        results = [box.run_python(code) for code in ("import os\nprint(os.getcwd())", read_only, "1/0",
                                                     "import time\ntime.sleep(100)")]
    assert [r.status for r in results] == ["ok", "ok", "error", "timeout"]
    assert os.path.dirname(results[0].output.strip()) == str(root)
    assert os.listdir(root) == []


def test_failed_when_the_run_cannot_start(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    with Sandbox() as box:
        result = box.run_python("print(1)")
    assert result.status == "failed"
    assert result.detail.startswith("no temp dir: ")


@pytest.mark.parametrize("field, value", [("wall_s", 0), ("wall_s", float("inf")), ("cpu_s", 0.5), ("cpu_s", 0),
                                          ("memory_bytes", 1 << 20), ("output_bytes", 0), ("max_processes", 0),
                                          ("max_concurrent", 0), ("network", "no")])
def test_limits_are_validated(field, value):
    with pytest.raises(ValueError, match=rf"^{field} \({value!r}\)"):
        SandboxLimits(**{field: value})
