"""Deployments and UIs: `deployfit serve` serves prefect.yaml's deployments (their schedules included) so
the Prefect UI can trigger them; `deployfit ui` starts a Prefect server and an MLflow server on 127.0.0.1
over the stores the flows use."""
from __future__ import annotations

import importlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable


from estimators.errors import UserInputError, read_yaml_mapping

from . import tracking
from .reaper import stop_processes

REPO = Path(__file__).resolve().parents[1]


def load_deployments(file: str) -> list[dict]:
    """The deployments of a prefect.yaml: name, entrypoint (path.py:function), schedules, parameters."""
    p = Path(file)
    if not p.is_file():
        p = REPO / file
    if not p.is_file():
        raise UserInputError(f"deployments file {file} does not exist")
    deps = read_yaml_mapping(p, f"deployments file {file}", empty_ok=True).get("deployments") or []
    if not deps:
        raise UserInputError(f"{file} names no deployments")
    for d in deps:
        for key in ("name", "entrypoint"):
            if not d.get(key):
                raise UserInputError(f"a deployment in {file} has no {key}")
    return deps


def _flow_of(entrypoint: str):
    path, _, fn = entrypoint.partition(":")
    module = path.removesuffix(".py").replace("/", ".")
    try:
        return getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as exc:
        raise UserInputError(f"entrypoint {entrypoint} cannot be loaded: {exc}") from None


def runner_deployments(file: str) -> list:
    out = []
    for d in load_deployments(file):
        from prefect.schedules import Cron

        schedules = [Cron(s["cron"], timezone=s.get("timezone")) for s in d.get("schedules") or [] if s.get("cron")]
        out.append(_flow_of(d["entrypoint"]).to_deployment(
            name=d["name"], schedules=schedules or None, parameters=d.get("parameters") or {},
            description=d.get("description"), tags=d.get("tags") or ["deployfit"]))
    return out


def serve_deployments(file: str = "prefect.yaml", say: Callable[[str], None] = print) -> None:
    """Serve the file's deployments until interrupted. Stopping does not pause their schedules: the nightly run
    stays scheduled and runs when a server is serving again."""
    from prefect import serve
    from prefect.settings import PREFECT_API_URL

    deployments = runner_deployments(file)
    api = PREFECT_API_URL.value()
    say(f"serving {len(deployments)} deployments of {file} on " + (f"the Prefect API {api}" if api else
        "a temporary Prefect API this command starts (its runs are seen by `deployfit ui` on this machine; set "
        "PREFECT_API_URL to serve a running server)"))
    serve(*deployments, pause_on_shutdown=False)


def _wait(url: str, timeout: float) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except Exception:
            time.sleep(0.5)
    return False


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on host:port now (a socket in TIME_WAIT does not count as taken, as for the
    servers themselves, which reuse addresses)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


STOP_S = 5.0


def ensure_prefect_home() -> Path:
    """PREFECT_HOME, made where it does not exist: Prefect's server cannot create its database in a missing
    folder (a temporary server waits out its start-up timeout, then fails with a traceback)."""
    from prefect.settings import PREFECT_HOME

    home = Path(PREFECT_HOME.value()).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def start_uis(prefect_port: int = 4200, mlflow_port: int = 5000, say: Callable[[str], None] = print,
              block: bool = True) -> list[subprocess.Popen]:
    """A Prefect server (the database under PREFECT_HOME the ephemeral runs use) and an MLflow server (the
    tracking store the flows write: MLFLOW_TRACKING_URI, else mlflow/mlflow.db) on 127.0.0.1."""
    uri = tracking.tracking_uri()
    if uri.startswith("http"):
        raise UserInputError(f"MLFLOW_TRACKING_URI is a server ({uri}): open it directly")
    for what, port, flag in (("Prefect", prefect_port, "--prefect-port"), ("MLflow", mlflow_port, "--mlflow-port")):
        if not port_free(port):
            raise UserInputError(f"port {port} on 127.0.0.1 is taken (another server listens there): give the "
                                 f"{what} server another with {flag}")
    bindir = Path(sys.executable).parent
    prefect_bin = shutil.which("prefect", path=str(bindir)) or "prefect"
    mlflow_bin = shutil.which("mlflow", path=str(bindir)) or "mlflow"
    # the UI's pages call the API at PREFECT_UI_API_URL, which does not follow --port: say where it is
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": f"http://127.0.0.1:{prefect_port}/api"}
    art = tracking.DEFAULT_ARTIFACTS if uri == f"sqlite:///{tracking.DEFAULT_DB}" else None
    tracking.DEFAULT_DB.parent.mkdir(parents=True, exist_ok=True)
    ensure_prefect_home()  # the server's database lives there
    procs = [subprocess.Popen([prefect_bin, "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT),
             subprocess.Popen([mlflow_bin, "server", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port",
                               str(mlflow_port), "--workers", "1"]
                              + (["--default-artifact-root", art.resolve().as_uri()] if art else []),
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)]
    purl, murl = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
    say("starting the Prefect and MLflow servers ...")
    ok_p = _wait(f"{purl}/api/health", 90)
    ok_m = _wait(f"{murl}/health", 90)
    say(f"Prefect UI: {purl}  ({'up' if ok_p else 'not answering yet'}; flows run from this machine use it when "
        f"PREFECT_API_URL={purl}/api)")
    say(f"MLflow UI:  {murl}/#/?{tracking.ML_VIEW}  ({'up' if ok_m else 'not answering yet'}; store {uri})")
    if not block:
        return procs
    say("Ctrl-C stops both.")
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        # one deadline for both: stopped within the seconds a service manager gives
        stop_processes(procs, STOP_S, signal.SIGINT, tree=True)
    return procs
