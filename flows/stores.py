"""Shared stores for several users: PostgreSQL (Debian's postgresql package) on loopback, a Prefect server
and an MLflow tracking server on it (`deployfit stores up`).

    deployfit stores up [--dir build/stores] [--pg-port 5433] [--prefect-port 4200] [--mlflow-port 5000]

initdb's a cluster under DIR/pg the first time (trust on 127.0.0.1 only), starts it, creates the databases
`prefect` and `mlflow`, then starts `prefect server` (PREFECT_API_DATABASE_CONNECTION_URL on PostgreSQL) and
`mlflow server` (backend store on PostgreSQL; artifacts served by the server from DIR/mlflow-artifacts, so
clients upload them over HTTP), and prints the two variables every user's flows need. PostgreSQL refuses to
run as root: as root the cluster belongs to the `postgres` user the package creates.
"""
from __future__ import annotations

import glob
import os
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
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def pg_url(self) -> str:
        return f"postgres@127.0.0.1:{self.pg_port}"

    @property
    def env(self) -> dict[str, str]:
        """What a user's flows need to use these stores."""
        return {"PREFECT_API_URL": f"http://127.0.0.1:{self.prefect_port}/api",
                "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{self.mlflow_port}"}

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        data = self.root / "pg"
        if (data / "postmaster.pid").exists():
            subprocess.run(_as_owner([pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "stop"]),
                           capture_output=True, timeout=60)


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


def start_postgres(root: Path, port: int, say: Callable[[str], None] = print) -> None:
    data = root / "pg"
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    if not (data / "PG_VERSION").exists():
        say(f"initdb {data}")
        data.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(data, "postgres")
        subprocess.run(_as_owner([pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
                       check=True, capture_output=True, timeout=120)
    subprocess.run(_as_owner([pg_bin("pg_ctl"), "-D", str(data), "-l", str(data / "server.log"), "-w", "-t", "60",
                              "-o", f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={data} "
                                    "-c max_connections=200", "start"]), check=True, capture_output=True, timeout=90)
    for db in ("prefect", "mlflow"):
        r = subprocess.run([pg_bin("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-tAc",
                            f"SELECT 1 FROM pg_database WHERE datname='{db}'"], capture_output=True, text=True, timeout=30)
        if r.stdout.strip() != "1":
            subprocess.run([pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", db], check=True,
                           capture_output=True, timeout=30)
    say(f"PostgreSQL on 127.0.0.1:{port} (databases prefect, mlflow)")


def up(root: str = "build/stores", pg_port: int = 5433, prefect_port: int = 4200, mlflow_port: int = 5000,
       say: Callable[[str], None] = print) -> Stores:
    """Start PostgreSQL, the Prefect server and the MLflow server on it; returns them running."""
    r = Path(root).resolve()
    st = Stores(r, pg_port, prefect_port, mlflow_port)
    start_postgres(r, pg_port, say)
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{st.pg_url}/prefect",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(r / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    logs = r / "logs"
    logs.mkdir(exist_ok=True)
    plog, mlog = logs / "prefect.log", logs / "mlflow.log"
    try:
        st.procs.append(subprocess.Popen([str(bindir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                          str(prefect_port)], env=env, stdout=plog.open("w"), stderr=subprocess.STDOUT))
        st.procs.append(subprocess.Popen([str(bindir / "mlflow"), "server", "--backend-store-uri",
                                          f"postgresql+psycopg2://{st.pg_url}/mlflow", "--serve-artifacts",
                                          "--artifacts-destination", str(r / "mlflow-artifacts"), "--host", "127.0.0.1",
                                          "--port", str(mlflow_port), "--workers", "1"],
                                         env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                                         stdout=mlog.open("w"), stderr=subprocess.STDOUT))
        _wait_http(f"http://127.0.0.1:{prefect_port}/api/health", 180, st.procs[0], plog)
        _wait_http(f"http://127.0.0.1:{mlflow_port}/health", 180, st.procs[1], mlog)
    except BaseException:
        st.stop()
        raise
    say(f"Prefect server: http://127.0.0.1:{prefect_port} (PostgreSQL database prefect)")
    say(f"MLflow server:  http://127.0.0.1:{mlflow_port} (PostgreSQL database mlflow, artifacts {r / 'mlflow-artifacts'})")
    say("every user's shell: " + " ".join(f"export {k}={v};" for k, v in st.env.items()))
    return st
