"""The GCS API emulator (tests/gcs_emulator.py) as a pytest fixture, and object helpers for the gs:// tests.

Importing this from a test module skips that module when the gs:// libraries are missing. The fixture points
every client at the emulator through the environment (inherited by subprocesses): orbax/tensorstore through
``TENSORSTORE_GCS_HTTP_URL`` (+ ``GOOGLE_AUTH_TOKEN_FOR_TESTING``), ArrayRecord's reader (google-cloud-cpp)
through ``CLOUD_STORAGE_EMULATOR_ENDPOINT``, the file layer (etils.epath -> gcsfs) and the google-cloud-storage
client through ``STORAGE_EMULATOR_HOST``.
"""
import importlib.util
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

for _package in ("gcp_storage_emulator", "gcsfs", "google.cloud.storage"):
    if importlib.util.find_spec(_package) is None:  # (importing gcsfs here would be too early: see gcs())
        pytest.skip(f"the gs:// tests need {_package}: pip install -e '.[test]'", allow_module_level=True)

BUCKET = "harness-test"
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator on a free port with an empty bucket; the endpoint settings in os.environ (inherited by
    subprocesses) while the module runs. Yields the bucket's URI."""
    port = _free_port()
    log = tmp_path_factory.mktemp("gcs") / "emulator.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "tests.gcs_emulator", str(port), BUCKET], cwd=ROOT,
                                stdout=f, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while "ready" not in log.read_text() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert "ready" in log.read_text(), log.read_text()
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
           "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
           # gcsfs would ask the Storage Control API (gRPC, not emulated) for each bucket's layout
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "GOOGLE_CLOUD_PROJECT": "test"}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield f"gs://{BUCKET}"
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.kill()
    proc.wait()


def blob(uri: str):
    """The google-cloud-storage blob of ``gs://bucket/name`` (a client of its own: no cached listings)."""
    from google.cloud import storage

    bucket, _, name = uri[len("gs://"):].partition("/")
    return storage.Client().bucket(bucket).blob(name)


def names(uri: str) -> list[str]:
    """The names of the objects under the directory ``uri``, relative to it, sorted."""
    from google.cloud import storage

    bucket, _, prefix = uri[len("gs://"):].partition("/")
    return sorted(b.name[len(prefix) + 1:] for b in storage.Client().list_blobs(bucket, prefix=prefix + "/"))
