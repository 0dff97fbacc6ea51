"""`python -m deployments.engine.orphan_guard <parent pid> <module> [args...]`: run `<module>` as `__main__`, in a
process that the kernel kills the moment its parent dies (SIGKILL included), from its first instruction on.

Why: the replica starts its engine in a child (deployments.engine.process). The child notices a closed
socket only once it reads it, i.e. after loading the model — minutes on a GPU, all that time holding GPU
memory the replacement replica needs. Linux's parent-death signal (prctl PR_SET_PDEATHSIG) ends it at
once instead. It must be set before the heavy imports start: `python -m deployments.engine.child` would
import `deployments/engine/core.py` (torch, transformers) before any of the child's own code ran, so
this light module (stdlib only; `deployments/__init__.py` is empty) is the entry point and runs the
child's module after. Its name stays on the command line (benchmarks find the engine process by it).

The pitfalls, and how each is met:

1. The parent may die before prctl runs (the interpreter's start-up comes first): the signal is then
   never sent. After setting it, the parent pid is compared with the one the parent passed: a
   different one (the child was re-parented to init or a subreaper) means the parent is gone — exit.
   Set first, checked second, so a death at any moment is caught by one or the other.
2. The signal fires when the parent *thread* that forked the child exits, not the parent process.
   The parent forks from a thread that lives as long as its process (engine_process._spawn), so a
   live replica's child is never killed by a thread of the replica ending.
3. subprocess's `preexec_fn` (the usual place for prctl) may deadlock in a multi-threaded parent, as
   the replica is; prctl runs here, after exec, instead.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Exit code when the parent was already gone before the signal was in force.
PARENT_GONE = 3


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies; exit now if it already has.
    SIGKILL: nothing the heavy imports install (signal handlers, a wedged C call) may delay it."""
    if not sys.platform.startswith("linux"):
        return  # no PR_SET_PDEATHSIG: the child still exits when the replica's end of its socket closes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    if os.getppid() != parent_pid:
        os._exit(PARENT_GONE)  # pitfall 1: the parent died before the line above took effect


def main(argv: list[str]) -> None:
    parent_pid, module, args = int(argv[0]), argv[1], argv[2:]
    die_with_parent(parent_pid)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
