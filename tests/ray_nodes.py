"""Several Ray nodes on one machine, started with `ray start` as an operator would.

Each node declares its own GPUs and `gpu_slot_<i>` resources
(`placement.ray_options.ray_start_args`), labels and memory; or, in the
per-GPU mode, one node per GPU (`add_gpu_node`: that GPU's index in the
raylet's CUDA_VISIBLE_DEVICES, `--num-gpus=1`, the labels and memory resource
of `placement.gpu_nodes.gpu_node_start_args`). Every process is found by this
cluster's own temp dir, GCS port or node manager port: other test runs may start
clusters on this machine at the same time, so never `ray stop`.

Ports: each cluster has a temp dir of its own (short, for the 107-byte limit of
the AF_UNIX socket paths under it); the dashboard agents, metrics agents and
metrics exports bind port 0 (the OS picks, Ray reads the port back); the ports a
test must name (GCS, node manager) are picked free, and a `ray start` that loses
one to another process is started again on fresh ports (`START_ATTEMPTS`).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from deployments.ports import free_port
from placement.gpu_nodes import gpu_node_start_args
from placement.ray_options import ray_start_args
from placement.units import GIB

STOP_GRACE_S = 5.0
START_TIMEOUT_S = 120.0
START_ATTEMPTS = 3  # a `ray start` whose free port was taken meanwhile is retried on fresh ports
# What `ray start` and the processes it starts say when a port they were given is taken.
_PORT_TAKEN = re.compile(r"address already in use|failed to bind|port \d+ .*in use|EADDRINUSE", re.IGNORECASE)
NODE_MEMORY = 2 * GIB  # Ray's logical memory per node: one machine's RAM is shared by all
OBJECT_STORE_BYTES = 200 * 2**20


def short_temp_dir(prefix: str) -> str:
    """A fresh directory directly under /tmp (not $TMPDIR, which may be long): Ray puts AF_UNIX sockets
    (limit 107 bytes) at <temp dir>/session_<date>_<pid>/sockets/..., ~70 bytes below it."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp" if os.path.isdir("/tmp") else None)


def ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: state, parent pid, ... (the name may hold spaces)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _process_table() -> tuple[dict[int, str], dict[int, int]]:
    """pid → command line, pid → parent pid, for every readable process."""
    cmdlines: dict[int, str] = {}
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdlines[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parents[int(proc.name)] = int(_stat_fields(int(proc.name))[1])
        except (OSError, IndexError, ValueError):
            continue
    return cmdlines, parents


def _with_descendants(roots: set[int], parents: dict[int, int]) -> set[int]:
    found = set(roots)
    grown = True
    while grown:  # agents and workers are children of their raylet
        children = {pid for pid, ppid in parents.items() if ppid in found} - found
        grown = bool(children)
        found |= children
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie has exited; only its parent has yet to reap it)."""
    try:
        return _stat_fields(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def terminate(pids: set[int], graceful: bool = True) -> None:
    """SIGTERM, then SIGKILL what ignores it (gcs_server, monitor), as `ray stop` does;
    `graceful=False`: SIGKILL at once (a cluster torn down after its tests: nothing to drain)."""
    pids = pids - {os.getpid()}
    for sig in (signal.SIGTERM, signal.SIGKILL) if graceful else (signal.SIGKILL,):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and any(_running(pid) for pid in pids):
            time.sleep(0.2)


def processes_under(temp_dir: str) -> set[int]:
    """The Ray processes that name `temp_dir` (each Ray of the tests has its own), with their children."""
    cmdlines, parents = _process_table()
    roots = {pid for pid, cmd in cmdlines.items() if "ray" in cmd and temp_dir in cmd}
    return _with_descendants(roots, parents)


def _node_manager_port(args: list[str]) -> int:
    return int(next(a for a in args if a.startswith("--node-manager-port=")).split("=", 1)[1])


class LocalRayCluster:
    """A head started on construction; workers added with `add_worker`, removed with `kill_worker`."""

    def __init__(self, env: dict[str, str], temp_dir: str, port: int):
        self.env, self.temp_dir, self.port = env, temp_dir, port
        self.worker_ports: list[int] = []  # node manager port of each worker: finds its raylet

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(
        self,
        args: Callable[[], list[str]],
        num_cpus: float,
        env: dict[str, str] | None = None,
        started: Callable[[list[str]], set[int]] | None = None,
    ) -> list[str]:
        """`ray start` with `args()` (fresh ports each call); started again, after killing what the failed
        try left (`started(args)`: its processes), when it failed because a port was taken. Returns the args."""
        common = [f"--num-cpus={num_cpus}", f"--memory={NODE_MEMORY}", f"--object-store-memory={OBJECT_STORE_BYTES}"]
        # No log monitor: it streams worker logs to drivers, and the tests' drivers do not take them.
        common.append("--include-log-monitor=false")
        failures = []
        for _ in range(START_ATTEMPTS):
            tried = args()
            done = subprocess.run(
                [ray_cli(), "start", *tried, *common],
                env={**self.env, **(env or {})},
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT_S,
            )
            if done.returncode == 0:
                return tried
            failures.append(f"ray start {' '.join(tried)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            if not _PORT_TAKEN.search(done.stdout + done.stderr):
                break
            if started is not None:
                terminate(started(tried), graceful=False)
        raise AssertionError("\n---\n".join(failures))

    def start_head(self, gpus: int, labels: dict[str, str], num_cpus: int = 1) -> None:
        def args() -> list[str]:
            self.port = free_port()
            head = [*ray_start_args(gpus, node_labels=labels), f"--port={self.port}", f"--temp-dir={self.temp_dir}"]
            head += ["--include-dashboard=false", f"--dashboard-port={free_port()}"]
            return head + [f"--ray-client-server-port={free_port()}", "--dashboard-agent-listen-port=0"]

        self._start(args, num_cpus, started=lambda _: self.pids())

    def add_worker(self, gpus: int, labels: dict[str, str], num_cpus: int = 1) -> int:
        """Start a worker node; returns its node manager port (its handle for `kill_worker`)."""

        def args() -> list[str]:
            worker = [*ray_start_args(gpus, node_labels=labels, head=False), f"--address={self.address}"]
            return worker + ["--dashboard-agent-listen-port=0", f"--node-manager-port={free_port()}"]

        tried = self._start(args, num_cpus, started=self._node_pids)
        return self._register(tried)

    def add_gpu_node(self, host: str, index: int, memory_bytes: int, num_cpus: float = 1) -> int:
        """Start the Ray node of GPU `index` of `host` (per-GPU mode); returns its node manager port.

        Started again with the same arguments it is the same GPU node to rayfit (same labels), with a new node id.
        """

        def args() -> list[str]:
            node = gpu_node_start_args(host, [index], memory_bytes, address=self.address, agent_port=0)
            return [*node, f"--node-manager-port={free_port()}"]

        env = {"CUDA_VISIBLE_DEVICES": str(index), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
        tried = self._start(args, num_cpus, env=env, started=self._node_pids)
        return self._register(tried)

    def _register(self, args: list[str]) -> int:
        node_port = _node_manager_port(args)
        self.worker_ports.append(node_port)
        return node_port

    @staticmethod
    def _node_pids(args: list[str]) -> set[int]:
        """The processes of the worker node started with `args`: its raylet (by node manager port) and children."""
        cmdlines, parents = _process_table()
        flag = re.compile(rf"--node[-_]manager[-_]port={_node_manager_port(args)}(?!\d)")
        raylets = {pid for pid, cmd in cmdlines.items() if "raylet" in cmd and flag.search(cmd)}
        return _with_descendants(raylets, parents)

    def kill_worker(self, node_port: int) -> set[int]:
        """The worker node leaves: its raylet and everything under it (agents, replicas) are terminated."""
        pids = self._node_pids([f"--node-manager-port={node_port}"])
        assert pids, f"no raylet with node manager port {node_port}"
        terminate(pids)
        return pids

    def pids(self) -> set[int]:
        """Every process of this cluster: those naming our temp dir, GCS port or a worker's port, and children."""
        cmdlines, parents = _process_table()
        patterns = [re.compile(rf":{self.port}(?!\d)"), re.escape(self.temp_dir)]
        patterns += [re.compile(rf"--node[-_]manager[-_]port={p}(?!\d)") for p in self.worker_ports]
        roots = {pid for pid, cmd in cmdlines.items() if "ray" in cmd and any(re.search(p, cmd) for p in patterns)}
        return _with_descendants(roots, parents)

    def stop(self) -> None:
        """Kill every process of this cluster."""
        # Killed outright: the raylet and GCS wait out their own graceful shutdown (~10 s) otherwise.
        terminate(self.pids(), graceful=False)


@contextmanager
def local_ray_cluster(env: dict[str, str] | None = None) -> Iterator[LocalRayCluster]:
    """A cluster of our own (token auth on, as Ray 2.60 requires for extra nodes); stopped on exit."""
    full_env = {**os.environ, "RAY_AUTH_MODE": "token", **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    temp_dir = short_temp_dir("rf-mn-")
    cluster = LocalRayCluster(full_env, temp_dir, free_port())
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
