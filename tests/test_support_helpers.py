"""The suite's own safety nets: a hang ends with every thread's stack, a failure in a thread or in a
polled check is the test's, a held port is Serve's alone, and a local cluster that fails to start
leaves nothing running (tests/serve_support.py, tests/ray_nodes.py, deployments/ports.py)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from serve_support import ThreadGroup, run_in_threads, wait_until

from deployments.ports import free_port, listening_pids, reserved_port

ROOT = Path(__file__).resolve().parent.parent


def _inner_pytest(tmp_path: Path, source: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """Run one test file with this project's pytest configuration (pyproject.toml), as CI would."""
    path = tmp_path / "test_inner.py"
    path.write_text(textwrap.dedent(source))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ROOT / "pyproject.toml")]
    return subprocess.run(
        [*command, "--rootdir", str(tmp_path), str(path)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=tmp_path,
    )


# ---- bounded hangs -------------------------------------------------------------------------------


def test_every_test_has_a_time_limit_with_a_stack_dump(pytestconfig: pytest.Config) -> None:
    assert float(pytestconfig.getini("timeout")) == 600
    # signal: fails the test with every thread's stack, and the run goes on
    assert pytestconfig.getini("timeout_method") == "signal"
    assert 0 < float(pytestconfig.getini("faulthandler_timeout")) < 600


def test_a_hang_times_out_with_every_threads_stack(tmp_path: Path) -> None:
    started = time.monotonic()
    done = _inner_pytest(
        tmp_path,
        """
        import threading, time
        import pytest

        def stuck_helper():
            threading.Event().wait()

        @pytest.mark.timeout(3)
        def test_hangs():
            threading.Thread(target=stuck_helper, name="stuck-helper", daemon=True).start()
            time.sleep(300)
        """,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert time.monotonic() - started < 60
    assert "Timeout" in output, output
    assert "test_hangs" in output and "stuck_helper" in output, output  # both threads' stacks


# ---- failures surface ------------------------------------------------------------------------------


def test_an_assertion_in_a_plain_thread_fails_its_test(tmp_path: Path) -> None:
    done = _inner_pytest(
        tmp_path,
        """
        import threading

        def test_worker_fails():
            def work():
                assert 1 == 2, "the worker's check"

            thread = threading.Thread(target=work)
            thread.start()
            thread.join(10)
        """,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1 and "1 failed" in output, output
    assert "PytestUnhandledThreadExceptionWarning" in output and "the worker's check" in output, output


def test_thread_group_reraises_what_a_thread_raised() -> None:
    group = ThreadGroup("job")
    group.start(lambda: 1)
    group.start(lambda: (_ for _ in ()).throw(ValueError("first")))
    group.start(lambda: (_ for _ in ()).throw(KeyError("second")))
    with pytest.raises(ValueError, match="first") as raised:
        group.join(10)
    assert any("job-2 raised too: KeyError" in note for note in raised.value.__notes__)


def test_thread_group_fails_on_a_thread_still_running() -> None:
    release = threading.Event()
    group = ThreadGroup("slow")
    group.start(release.wait)
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"1 of 1 threads still running after 0.5 s: \['slow-0'\]"):
        group.join(0.5)
    assert time.monotonic() - started < 5
    release.set()


def test_run_in_threads_returns_results_in_order() -> None:
    assert run_in_threads([lambda i=i: i * i for i in range(5)], timeout_s=10) == [0, 1, 4, 9, 16]


def test_threads_fixture_joins_at_teardown(threads: ThreadGroup) -> None:
    threads.start(time.sleep, 0.1)  # not joined here: the fixture joins it (and would re-raise)


def test_wait_until_reports_the_last_exception() -> None:
    calls = iter(range(100))

    def check() -> bool:
        raise ConnectionError(f"refused #{next(calls)}")

    with pytest.raises(
        AssertionError,
        match=r"the server: not within 0.3 s \(\d+ checks; the last check raised "
        r"ConnectionError: refused #\d+",
    ) as raised:
        wait_until(check, 0.3, "the server", interval_s=0.05)
    assert isinstance(raised.value.__cause__, ConnectionError)


def test_wait_until_says_when_the_last_check_only_returned_false() -> None:
    answers = iter([ValueError("warming up")] + [False] * 100)

    def check() -> bool:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    with pytest.raises(
        AssertionError, match="an earlier check .the last returned false. raised ValueError: warming up"
    ):
        wait_until(check, 0.2, "ready", interval_s=0.05)


def test_wait_until_retries_only_what_the_caller_allows() -> None:
    def check() -> bool:
        raise KeyError("not a 'not yet'")

    started = time.monotonic()
    with pytest.raises(KeyError):
        wait_until(check, 30, "anything", retry_on=(ConnectionError,))
    with pytest.raises(KeyError):
        wait_until(check, 30, "anything", retry_on=())
    assert time.monotonic() - started < 5  # raised at once, not after the timeout


def test_wait_until_returns_the_seconds_it_took() -> None:
    ready_at = time.monotonic() + 0.2
    assert 0.15 < wait_until(lambda: time.monotonic() >= ready_at, 10, "soon", interval_s=0.05) < 5


# ---- ports ------------------------------------------------------------------------------------------


def test_a_reserved_port_is_only_for_a_reuseport_server() -> None:
    with reserved_port() as port:
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))  # anyone else: taken
        with socket.socket() as server:  # Serve's proxy binds like this (SO_REUSEADDR + SO_REUSEPORT)
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            server.bind(("127.0.0.1", port))
            server.listen()
            assert listening_pids(port) == {os.getpid()}
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass  # the listener, not the reservation, takes the connection
    assert listening_pids(port) == set()


# ---- local clusters: their own state, and nothing left after a failed start ------------------------


@pytest.mark.slow
def test_start_serve_leaves_a_port_another_server_also_listens_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process's SO_REUSEPORT server on the held port (it picked the port free before it was held):
    the listeners read back show it, and Serve starts again on a port of its own."""
    import ray
    import serve_support
    from ray import serve

    intruder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, sys, time\n"
            "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
            "s.bind(('127.0.0.1', 0)); s.listen(); print(s.getsockname()[1], flush=True); time.sleep(300)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        taken = int(intruder.stdout.readline())  # type: ignore[union-attr]
        ports = iter([taken])
        real = serve_support.reserved_port

        def first_the_taken_port(host: str = "127.0.0.1"):  # type: ignore[no-untyped-def]
            taken_port = next(ports, None)
            if taken_port is None:
                return real(host)
            from contextlib import nullcontext

            return nullcontext(taken_port)

        monkeypatch.setattr(serve_support, "reserved_port", first_the_taken_port)
        serve_support.init_local_ray(num_cpus=1)
        try:
            port = serve_support.start_serve()
            assert port != taken
            assert intruder.pid not in listening_pids(port)
            # The first try's proxy leaves it to the other server.
            wait_until(lambda: listening_pids(taken) == {intruder.pid}, 30, "the first proxy gone")
        finally:
            serve.shutdown()
            ray.shutdown()
    finally:
        intruder.kill()
        intruder.wait()


@pytest.mark.slow
def test_a_failed_serve_start_leaves_no_ray_running_and_the_next_starts_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    import serve_support

    started: list[str] = []
    real_temp_dir = serve_support.short_temp_dir

    def recorded_temp_dir(prefix: str) -> str:
        started.append(real_temp_dir(prefix))
        return started[-1]

    def broken_start(**_: object) -> int:
        assert ray.is_initialized()  # ray.init ran: there is something to tear down
        raise RuntimeError("serve.start failed")

    before = dict(os.environ)
    with monkeypatch.context() as patched:
        patched.setattr(serve_support, "short_temp_dir", recorded_temp_dir)
        patched.setattr(serve_support, "start_serve", broken_start)
        with pytest.raises(RuntimeError, match="serve.start failed"):
            with serve_support.local_serve(num_cpus=1, env={"RAYFIT_TEST_MARKER": "1"}):
                pytest.fail("never yields")
    assert not ray.is_initialized()
    assert dict(os.environ) == before  # the replicas' environment is not left in this process
    assert Path(started[0]).is_dir()  # kept: its logs say why the start failed
    shutil.rmtree(started[0], ignore_errors=True)
    # The next module's cluster starts as usual, with state of its own: its temp dir, its agents' ports
    # (bound by the OS, read back by Ray), an HTTP port only its proxy listens on.
    with serve_support.local_serve(num_cpus=1) as port:
        node = ray._private.worker.global_worker.node
        temp_dir = node.get_temp_dir_path()
        assert Path(temp_dir).parent == Path("/tmp") and Path(temp_dir).name.startswith("rf-")
        assert len(node.get_session_dir_path()) + len("/sockets/plasma_store") < 107  # AF_UNIX limit
        assert node.dashboard_agent_listen_port not in (0, 52365)
        assert node.metrics_export_port not in (0, 52365)
        listeners = listening_pids(port)
        assert listeners and listeners <= serve_support.this_node_pids()
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            pass  # the proxy accepts (it answers 503 until an app gives it routes)
    assert not ray.is_initialized() and not Path(temp_dir).exists()


@pytest.mark.slow
def test_a_node_start_that_times_out_is_tried_once_more(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray gives up on a raylet that has not registered in its fixed 30 s, and leaves the processes it had
    started, which ray.shutdown() does not know. The first try here starts such processes (a `ray start` on
    its temp dir) and fails that way; the second gets a fresh temp dir, and nothing of the first is left."""
    import ray
    import serve_support
    from ray_nodes import processes_under, ray_cli

    real_init = serve_support._init_with_own_ports
    tries: list[str] = []

    def first_times_out(temp_dir: str, ray_init: dict[str, object]) -> None:
        tries.append(temp_dir)
        if len(tries) > 1:
            return real_init(temp_dir, ray_init)
        head = [f"--temp-dir={temp_dir}", f"--port={free_port()}", "--include-dashboard=false", "--num-cpus=0"]
        head += ["--dashboard-agent-listen-port=0", "--include-log-monitor=false"]
        subprocess.run([ray_cli(), "start", "--head", *head], check=True, capture_output=True, timeout=120)
        assert processes_under(temp_dir)  # what the failed try leaves running
        raise Exception(f"{serve_support._NODE_START_TIMED_OUT}. This could happen because ...")

    monkeypatch.setattr(serve_support, "_init_with_own_ports", first_times_out)
    with pytest.warns(UserWarning, match="did not start in Ray's 30 s"):
        temp_dir = serve_support.init_local_ray(num_cpus=1)
    try:
        assert tries == [tries[0], temp_dir] and tries[0] != temp_dir
        assert ray.is_initialized() and ray.get_runtime_context().get_node_id()
        assert not processes_under(tries[0]), "the first try's Ray is still running"
    finally:
        ray.shutdown()
        for directory in tries:
            shutil.rmtree(directory, ignore_errors=True)
