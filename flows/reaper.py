"""Nothing a command started outlives it, even when it is killed with SIGKILL.

A long-running command (`run`, `ui`, `stores up`, `serve`, `worker`, `calibrate`) starts servers and workers:
Prefect's temporary API server, MLflow and Prefect servers, PostgreSQL, Dask workers. Their own shutdown code
runs on Ctrl-C and SIGTERM, but not on SIGKILL or an out-of-memory kill, and children of children (uvicorn
under `mlflow server`, a postmaster after `pg_ctl`) are out of reach of a parent-death signal, which covers
one generation only. So `install()` starts a small watchdog in its own session: it notes this process's
descendants every second and, once this process is gone (however it ended), stops every one it noted that
is still the same process (pid and start time), with their current descendants: SIGTERM, then SIGKILL after a
grace period. It watches by polling, not by a pipe: a pipe's end would be inherited by forked children and
keep the pipe open after this process dies.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

GRACE_S = 4.0
# liveness is one /proc read; the descendant scan reads all of /proc (a few ms), so it runs every fourth poll,
# at the lowest priority, to stay out of the latency measurements the watched command makes
POLL_S = 0.25
SCAN_EVERY = 4

_WATCHDOG = r"""
import os, sys, time
import psutil

parent, grace, poll, scan_every = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
me = os.getpid()
try:
    watched = psutil.Process(parent)
except psutil.Error:
    sys.exit(0)
seen = {}


def alive():
    try:
        return watched.is_running() and watched.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


os.nice(19)
tick = 0
while alive():
    if tick % scan_every == 0:
        try:
            for c in watched.children(recursive=True):
                if c.pid != me:
                    try:
                        seen.setdefault(c.pid, c.create_time())
                    except psutil.Error:
                        pass
        except psutil.Error:
            pass
        for pid in [pid for pid in seen if not psutil.pid_exists(pid)]:
            del seen[pid]
    tick += 1
    time.sleep(poll)
procs = []
for pid, started in seen.items():
    try:
        p = psutil.Process(pid)
        if p.create_time() == started:
            procs.append(p)
            procs.extend(c for c in p.children(recursive=True) if c.pid != me)
    except psutil.Error:
        pass
for p in procs:
    try:
        p.terminate()
    except psutil.Error:
        pass
_, left = psutil.wait_procs(procs, timeout=grace)
for p in left:
    try:
        p.kill()
    except psutil.Error:
        pass
"""

_installed: subprocess.Popen | None = None
PR_SET_CHILD_SUBREAPER = 36


def _adopt_orphans() -> None:
    """Linux: a process orphaned below this one (a daemon's double fork) is re-parented here rather than to init,
    so it stays a descendant the watchdog sees; elsewhere, the watchdog sees what it catches between forks."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def kill_tree(pid: int) -> None:
    """SIGKILL a process and what it started (uvicorn's workers under `mlflow server`)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        for p in [*proc.children(recursive=True), proc]:
            p.kill()
    except psutil.Error:
        pass


def stop_processes(procs: list[subprocess.Popen], timeout_s: float, sig: int | None = signal.SIGTERM,
                   tree: bool = False) -> None:
    """Stop servers this process started: `sig` to each one still running (None: they were told to stop
    already), then one deadline of `timeout_s` for all of them; one still running then is killed, with what it
    started where `tree`."""
    if sig is not None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)
    deadline = time.time() + timeout_s
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            kill_tree(p.pid) if tree else p.kill()


def install() -> None:
    """Start this process's watchdog (once per process): from now on, whatever this process starts is stopped
    when it ends, however it ends."""
    global _installed
    if _installed is not None and _installed.poll() is None:
        return
    _adopt_orphans()
    _installed = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(GRACE_S), str(POLL_S),
                                   str(SCAN_EVERY)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
