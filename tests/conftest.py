"""Test set-up: every store and cache the code may write goes to a temporary folder, never $HOME or the repo."""
import os
import sys
import tempfile
from pathlib import Path

_TMP = Path(tempfile.mkdtemp(prefix="deployfit-tests-"))
os.environ["HABANA_LOGS"] = str(_TMP / "inc-logs")
os.environ["PREFECT_HOME"] = str(_TMP / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_TMP / 'mlflow.db'}"
os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(_TMP / "inductor")
os.environ["TQDM_DISABLE"] = "1"
os.environ["DEPLOYFIT_CACHE_DIR"] = str(_TMP / "cache")
os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = str(_TMP / "hypothesis")

sys.path.insert(0, str(Path(__file__).parent))  # tests/tinynets.py as a factory module

from hosts import seed_host  # noqa: E402

seed_host()  # this machine's host profile in the tests' cache (tests/hosts.py)

from hypothesis import settings  # noqa: E402

# hypothesis keeps no example database (it would write .hypothesis/ into the working directory)
settings.register_profile("deployfit", database=None)
settings.load_profile("deployfit")
