"""Shared stores for several users: PostgreSQL (Debian's postgresql package) on loopback, a Prefect server
and an MLflow tracking server on it (`deployfit stores up`).

    deployfit stores up [--dir build/stores] [--pg-port 5433] [--prefect-port 4200] [--mlflow-port 5000]

initdb's a cluster under DIR/pg the first time, with password (SCRAM-SHA-256) authentication for every
connection: the superuser's password is a generated secret kept in DIR/pg-secret (mode 0600, the cluster owner's),
so no other local account can reach the databases. A cluster made by an earlier version with trust
authentication is moved to the secret on its next start. PostgreSQL runs as this command's child (not daemonised
by pg_ctl), so it stops with it. Creates the databases `prefect` and `mlflow`, then starts `prefect server`
(PREFECT_API_DATABASE_CONNECTION_URL on PostgreSQL) and `mlflow server` (backend store on PostgreSQL; artifacts
served by the server from DIR/mlflow-artifacts, so clients upload them over HTTP), and prints the two variables
every user's flows need. The secret travels in environment variables only, never on a command line (which any
local user can read). PostgreSQL refuses to run as root: as root the cluster belongs to the `postgres` user the
package creates.
"""
from __future__ import annotations

import glob
import os
import re
import secrets
import signal
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from estimators.errors import UserInputError


def pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        raise UserInputError(f"PostgreSQL's {name} is not installed: apt-get install postgresql (Debian)")
    return found


def _as_owner(cmd: list[str]) -> list[str]:
    """PostgreSQL's server programs refuse root: run them as the package's `postgres` user."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@dataclass
class Stores:
    root: Path
    pg_port: int
    prefect_port: int
    mlflow_port: int
    secret: str = ""
    procs: list[subprocess.Popen] = field(default_factory=list)  # PostgreSQL first, then the two servers

    @property
    def pg_url(self) -> str:
        return f"postgres:{self.secret}@127.0.0.1:{self.pg_port}"

    @property
    def env(self) -> dict[str, str]:
        """What a user's flows need to use these stores."""
        return {"PREFECT_API_URL": f"http://127.0.0.1:{self.prefect_port}/api",
                "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{self.mlflow_port}"}

    def stop(self) -> None:
        """The servers first (they hold connections), then PostgreSQL with a fast shutdown."""
        from .reaper import stop_processes

        stop_processes(self.procs[1:], 30)
        _stop_postgres(self.root / "pg")
        stop_processes(self.procs[:1], 30, sig=None)  # told to stop by _stop_postgres (a fast shutdown)


def _stop_postgres(data: Path) -> None:
    """SIGINT to the postmaster named in postmaster.pid: PostgreSQL's fast shutdown."""
    pid = _running_postmaster(data)
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGINT)
    except OSError:
        return
    for _ in range(300):
        if not (data / "postmaster.pid").exists():
            return
        time.sleep(0.1)


def _wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited; its log {log}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s; its log: {log}")


def _secret(root: Path) -> tuple[str, bool]:
    """The superuser's password from ROOT/pg-secret, created (0600, the cluster owner's) when missing; and
    whether it was created now."""
    path = root / "pg-secret"
    if path.exists():
        value = path.read_text().strip()
        if value:
            return value, False
    value = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    os.chmod(path, 0o600)
    if os.geteuid() == 0:
        shutil.chown(path, "postgres")
    return value, True


def _client_env(secret: str) -> dict[str, str]:
    return {**os.environ, "PGPASSWORD": secret}


def _running_postmaster(data: Path) -> int | None:
    """The pid in DATA/postmaster.pid when that process is alive (a crashed server leaves the file behind)."""
    try:
        pid = int((data / "postmaster.pid").read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


def _trusting(data: Path) -> bool:
    """Whether pg_hba.conf lets any connection in without a password (a cluster of an earlier version)."""
    lines = [ln.split("#")[0].split() for ln in (data / "pg_hba.conf").read_text().splitlines()]
    return any(ln and ln[-1] == "trust" for ln in lines)


def start_postgres(root: Path, port: int, say: Callable[[str], None] = print) -> tuple[subprocess.Popen, str]:
    """Start the cluster under ROOT/pg as a child process (initdb'd with SCRAM on first use) and create the two
    databases; returns the process and the superuser's secret."""
    data = root / "pg"
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    secret, new_secret = _secret(root)
    fresh = not (data / "PG_VERSION").exists()
    if fresh:
        say(f"initdb {data} (password authentication; secret in {root / 'pg-secret'})")
        data.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(data, "postgres")
        r = subprocess.run(_as_owner([pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=scram-sha-256",
                                      f"--pwfile={root / 'pg-secret'}", "-E", "UTF8"]),
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise UserInputError(f"initdb {data} failed: {(r.stderr or r.stdout).strip()[-500:]}")
    elif (running := _running_postmaster(data)):
        raise UserInputError(f"a PostgreSQL server already runs on {data} (pid {running}): stop it first")
    log = data / "server.log"
    proc = subprocess.Popen(_as_owner([pg_bin("postgres"), "-D", str(data), "-p", str(port),
                                       "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={data}",
                                       "-c", "max_connections=200", "-c", "password_encryption=scram-sha-256"]),
                            stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.time()
        while subprocess.run([pg_bin("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)], timeout=30).returncode:
            if proc.poll() is not None:
                raise UserInputError(f"PostgreSQL on {data} exited ({proc.returncode}); its log {log}:\n"
                                     + log.read_text()[-1500:])
            if time.time() - t0 > 90:
                proc.terminate()
                raise UserInputError(f"PostgreSQL on {data} did not accept connections within 90 s; its log: {log}")
            time.sleep(0.3)
        env = _client_env(secret)
        psql = [pg_bin("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-d", "postgres",
                "-tAc"]
        if _trusting(data):
            say(f"moving {data} from trust to password authentication (secret in {root / 'pg-secret'})")
            alter = f"ALTER USER postgres PASSWORD '{secret}'"  # token_urlsafe: no quote to escape
            subprocess.run(psql + [alter], check=True, capture_output=True, env=env, timeout=30)
            hba = data / "pg_hba.conf"
            hba.write_text(re.sub(r"(?m)^([^#\n]*\s)trust(\s*)$", r"\1scram-sha-256\2", hba.read_text()))
            os.kill(_running_postmaster(data), signal.SIGHUP)  # the server just answered pg_isready
        elif new_secret and not fresh:
            raise UserInputError(f"{root / 'pg-secret'} was missing for the password-protected cluster {data}: "
                                 "restore it (a new secret was written; put the old one in its place)")
        for db in ("prefect", "mlflow"):
            r = subprocess.run(psql + [f"SELECT 1 FROM pg_database WHERE datname='{db}'"],
                               capture_output=True, text=True, timeout=30, env=env)
            if r.returncode != 0:
                raise UserInputError(f"PostgreSQL on 127.0.0.1:{port} refused the stored secret: "
                                     f"{r.stderr.strip()[-300:]}")
            if r.stdout.strip() != "1":
                subprocess.run([pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", db],
                               check=True, capture_output=True, timeout=30, env=env)
    except BaseException:
        _stop_postgres(data)
        if proc.poll() is None:
            proc.terminate()
        raise
    say(f"PostgreSQL on 127.0.0.1:{port} (databases prefect, mlflow; password authentication)")
    return proc, secret


def up(root: str = "build/stores", pg_port: int = 5433, prefect_port: int = 4200, mlflow_port: int = 5000,
       say: Callable[[str], None] = print) -> Stores:
    """Start PostgreSQL, the Prefect server and the MLflow server on it; returns them running."""
    r = Path(root).resolve()
    st = Stores(r, pg_port, prefect_port, mlflow_port)
    pg, st.secret = start_postgres(r, pg_port, say)
    st.procs.append(pg)
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{st.pg_url}/prefect",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(r / "prefect-home"),
           "PREFECT_UI_API_URL": f"http://127.0.0.1:{prefect_port}/api"}  # the UI's pages call the API there
    env.pop("PREFECT_API_URL", None)
    logs = r / "logs"
    logs.mkdir(exist_ok=True)
    plog, mlog = logs / "prefect.log", logs / "mlflow.log"
    try:
        st.procs.append(subprocess.Popen([str(bindir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                          str(prefect_port)], env=env, stdout=plog.open("w"), stderr=subprocess.STDOUT))
        st.procs.append(subprocess.Popen([str(bindir / "mlflow"), "server", "--serve-artifacts",
                                          "--artifacts-destination", str(r / "mlflow-artifacts"), "--host", "127.0.0.1",
                                          "--port", str(mlflow_port), "--workers", "1"],
                                         env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                                              "MLFLOW_BACKEND_STORE_URI": f"postgresql+psycopg2://{st.pg_url}/mlflow"},
                                         stdout=mlog.open("w"), stderr=subprocess.STDOUT))
        _wait_http(f"http://127.0.0.1:{prefect_port}/api/health", 180, st.procs[1], plog)
        _wait_http(f"http://127.0.0.1:{mlflow_port}/health", 180, st.procs[2], mlog)
    except BaseException:
        st.stop()
        raise
    say(f"Prefect server: http://127.0.0.1:{prefect_port} (PostgreSQL database prefect)")
    say(f"MLflow server:  http://127.0.0.1:{mlflow_port} (PostgreSQL database mlflow, artifacts {r / 'mlflow-artifacts'})")
    say(f"PostgreSQL:     postgres@127.0.0.1:{pg_port}, password in {r / 'pg-secret'}")
    say("every user's shell: " + " ".join(f"export {k}={v};" for k, v in st.env.items()))
    return st
