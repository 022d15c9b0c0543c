"""A killed command leaves nothing behind: after SIGKILL or SIGTERM of `run` (its temporary Prefect API server),
`ui` (the Prefect and MLflow servers) and `stores up` (PostgreSQL too), no process it started is left and
nothing it opened listens, within 10 s."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from hosts import fresh_process_key, free_ports, seed_host

ROOT = Path(__file__).resolve().parents[1]
GONE_WITHIN_S = 10

pytestmark = pytest.mark.slow


def _listening(procs: list[psutil.Process]) -> list[tuple[int, int]]:
    out = []
    for p in procs:
        try:
            out += [(p.pid, c.laddr.port) for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
        except (psutil.Error, OSError):  # gone between listing and reading
            pass
    return out


def _start(args: list[str], env: dict, tmp: Path, until, timeout_s: float = 240) -> tuple[subprocess.Popen, list]:
    """Start `deployfit ARGS`; wait until `until(descendants)` holds; return the process and its descendants."""
    log = (tmp / "cmd.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        assert proc.poll() is None, (tmp / "cmd.log").read_text()[-3000:]
        kids = psutil.Process(proc.pid).children(recursive=True)
        if until(kids):
            return proc, kids
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"not ready within {timeout_s} s: {(tmp / 'cmd.log').read_text()[-3000:]}")


def _kill_and_check(proc: subprocess.Popen, kids: list[psutil.Process], sig: int) -> None:
    listening = _listening(kids)
    assert listening, "nothing was listening before the kill"
    os.kill(proc.pid, sig)
    t0 = time.time()
    while time.time() - t0 < GONE_WITHIN_S:
        alive = [k for k in kids if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
        if not alive and proc.poll() is not None:
            break
        time.sleep(0.25)
    proc.poll()
    alive = [k for k in kids if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
    try:
        assert proc.returncode is not None, "the command itself still runs"
        assert not alive, [(k.pid, k.cmdline()[:6]) for k in alive]
        for _, port in listening:
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"
    finally:
        for k in alive:
            k.kill()
        if proc.poll() is None:
            proc.kill()


def _env(tmp: Path) -> dict:
    return {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "DEPLOYFIT_CACHE_DIR": str(tmp / "cache"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["KILL", "TERM"])
def test_a_killed_run_leaves_no_server(tmp_path, sig):
    """`run` without PREFECT_API_URL starts Prefect's temporary API server: killed mid-run, the server goes too."""
    seed_host(tmp_path / "cache", key=fresh_process_key())
    env = _env(tmp_path)
    env.pop("PREFECT_API_URL", None)
    proc, kids = _start(["run", "demo:digits-cnn", "--data", "digits", "--max-size-mb", "0.05", "--top-k", "1",
                         "--finetune-epochs", "1", "--out-dir", str(tmp_path / "out")], env, tmp_path,
                        until=lambda kids: bool(_listening(kids)))
    _kill_and_check(proc, kids, sig)


def test_a_terminated_ui_leaves_no_server(tmp_path):
    """SIGTERM stops `ui`'s servers in order (SIGKILL goes through the same watchdog as `run`'s)."""
    sig = signal.SIGTERM
    pp, mp = free_ports(2)
    proc, kids = _start(["ui", "--prefect-port", str(pp), "--mlflow-port", str(mp)], _env(tmp_path), tmp_path,
                        until=lambda kids: {pp, mp} <= {port for _, port in _listening(kids)})
    _kill_and_check(proc, kids, sig)


@pytest.mark.skipif(not (Path("/usr/lib/postgresql").is_dir() or any(
    Path(d, "initdb").exists() for d in os.environ.get("PATH", "").split(os.pathsep))),
    reason="PostgreSQL (Debian's postgresql package) is not installed")
def test_a_killed_stores_up_leaves_no_server_and_its_database_needs_the_secret(tmp_path):
    """`stores up` runs PostgreSQL with password authentication (the secret in a 0600 file, on no command line);
    SIGKILL of it stops PostgreSQL and both servers."""
    pg, pp, mp = free_ports(3)
    root = Path(tempfile.mkdtemp(prefix="deployfit-stores-"))  # under /tmp: the postgres user must reach it
    os.chmod(root, 0o755)
    proc, kids = _start(["stores", "up", "--dir", str(root), "--pg-port", str(pg), "--prefect-port", str(pp),
                         "--mlflow-port", str(mp)], _env(tmp_path), tmp_path,
                        until=lambda kids: {pg, pp, mp} <= {port for _, port in _listening(kids)})
    try:
        secret_file = root / "pg-secret"
        assert secret_file.stat().st_mode & 0o777 == 0o600
        secret = secret_file.read_text().strip()
        assert len(secret) >= 32
        for k in kids:
            try:
                args = k.cmdline()
            except (psutil.Error, OSError):  # a short-lived helper (pg_isready, psql) already gone
                continue
            assert not any(secret in a for a in args), args[:4]
        from flows.stores import pg_bin

        psql = [pg_bin("psql"), "-w", "-h", "127.0.0.1", "-p", str(pg), "-U", "postgres", "-d", "postgres", "-tAc",
                "select 1"]
        denied = subprocess.run(psql, capture_output=True, text=True, env={**os.environ, "PGPASSWORD": ""})
        assert denied.returncode != 0 and "password" in denied.stderr
        ok = subprocess.run(psql, capture_output=True, text=True, env={**os.environ, "PGPASSWORD": secret})
        assert ok.stdout.strip() == "1", ok.stderr
        _kill_and_check(proc, kids, signal.SIGKILL)
    finally:
        subprocess.run(["rm", "-rf", str(root)])
