"""Children (and their children) never outlive their parent."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from rlhf_engine.common.procs import descendants, start_child, stop_child
from tests.helpers.waiting import wait_until

# A child that starts a grandchild in the same process group, ignores SIGTERM, and sleeps.
STUBBORN = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print("ready", flush=True)
    time.sleep(60)
    """
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_stop_child_kills_the_whole_group(tmp_path):
    log = tmp_path / "child.log"
    proc = start_child(["-c", STUBBORN], log_path=log)
    wait_until(lambda: "ready" in log.read_text(), 20, message="the child ready")
    family = descendants(proc.pid)
    assert len(family) == 1  # the grandchild
    t0 = time.monotonic()
    stop_child(proc, grace_s=0.2)  # SIGTERM is ignored: escalates to SIGKILL
    assert time.monotonic() - t0 < 10
    wait_until(lambda: not any(_alive(p) for p in family), 5, message="the grandchild ended")
    assert stop_child(proc, grace_s=0) == proc.returncode  # idempotent


def test_child_dies_with_its_parent(tmp_path):
    # an intermediate parent starts a sleeping child with start_child, then dies hard
    pid_file = tmp_path / "pid"
    parent = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            import os
            from rlhf_engine.common.procs import start_child
            p = start_child(["-c", "import time; time.sleep(60)"])
            open({str(pid_file)!r}, "w").write(str(p.pid))
            os._exit(0)
        """)],
        timeout=30,
    )
    assert parent.returncode == 0
    child = int(pid_file.read_text())
    wait_until(lambda: not _alive(child), 5, message="the child ended with its parent")


# A leader with three grandchildren: one in its group, one in its own group (same session), one in
# its own session (found only as a descendant while the leader lives).
SCATTERED = textwrap.dedent(
    """
    import os, subprocess, sys, time
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    kids = [subprocess.Popen(sleep), subprocess.Popen(sleep, process_group=0), subprocess.Popen(sleep, start_new_session=True)]
    print("ready", *[k.pid for k in kids], flush=True)
    time.sleep(60)
    """
)


def _start_scattered(tmp_path):
    log = tmp_path / "child.log"
    proc = start_child(["-c", SCATTERED], log_path=log)
    wait_until(lambda: "ready" in log.read_text(), 20, message="the leader ready")
    kids = [int(p) for p in log.read_text().split()[1:4]]
    assert len(kids) == 3 and all(_alive(p) for p in kids)
    return proc, kids


def test_stop_child_ends_the_tree_of_a_live_leader(tmp_path):
    proc, kids = _start_scattered(tmp_path)
    stop_child(proc, grace_s=0.2)
    assert proc.returncode is not None
    assert not [p for p in kids if _alive(p)]


def test_stop_child_ends_the_group_and_session_of_a_dead_leader(tmp_path):
    import os
    import signal

    proc, kids = _start_scattered(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)  # the leader dies first: its children now have parent pid 1
    proc.wait()
    assert _alive(kids[0]) and _alive(kids[1])
    stop_child(proc, grace_s=0)
    # the two that stayed in the leader's group or session are gone; the one that left both is only
    # reachable while the leader lives
    assert not _alive(kids[0]) and not _alive(kids[1])
    os.kill(kids[2], signal.SIGKILL)


def test_stop_child_stops_a_process_that_is_not_a_group_leader():
    proc = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                             "time.sleep(60)"])
    t0 = time.monotonic()
    assert stop_child(proc, grace_s=0.1) == -9  # SIGTERM ignored: killed
    assert time.monotonic() - t0 < 10


def test_descendants_leave_out_zombies():
    # a child that exited and is not reaped yet runs nothing: not "left behind"
    living = subprocess.Popen(["sleep", "30"])
    ended = subprocess.Popen(["true"])
    try:
        wait_until(lambda: Path(f"/proc/{ended.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z", 10,
                   message="the child exited (a zombie)")
        found = descendants(os.getpid())
        assert living.pid in found and ended.pid not in found
    finally:
        living.kill()
        living.wait()
        ended.wait()
