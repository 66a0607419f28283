"""The test harness itself: a test that times out fails alone, and takes the processes it started with it."""

import os
import sys
import textwrap
import time

from conftest import REPO, run_child

INNER = textwrap.dedent('''
    import sys, time
    sys.path.insert(0, {tests!r})
    from conftest import run_child

    def test_hangs_with_a_grandchild():
        # bash starts a grandchild (like Lightning's extra ranks or Ray workers) and waits for it forever.
        run_child(["bash", "-c", "sleep 300 & echo $! > {pidfile}; wait"], timeout=600)

    def test_after_the_hung_one_still_runs():
        assert True
''')


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_timed_out_test_fails_alone_and_its_grandchildren_are_killed(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    (tmp_path / "test_inner.py").write_text(INNER.format(tests=str(REPO / "tests"), pidfile=pidfile))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", os.devnull, "--rootdir", str(tmp_path),
           "-o", "timeout=4", "-o", "timeout_method=signal", str(tmp_path / "test_inner.py")]
    started = time.monotonic()
    proc = run_child(cmd, timeout=120, cwd=tmp_path, check=False)
    assert proc.returncode == 1, proc.stdout[-2000:]  # 1 = some tests failed (a crashed run gives another code)
    assert "1 failed, 1 passed" in proc.stdout, proc.stdout[-2000:]
    assert "Timeout" in proc.stdout
    assert time.monotonic() - started < 60
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while pid_alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(grandchild), "the hung test's grandchild survived it"
