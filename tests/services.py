"""The servers tests start, each started one way, on free ports of the loopback address only.

``tests/test_localhost.py`` starts every one of them (and the demo's local Ray) and checks what
listens where, so a test that starts its server through here is covered by that check.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    """Until ``url`` answers (any HTTP status: 401 means the auth app is up too); fail with the log."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up:\n" + log.read_text()[-3000:])
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    """Stop a server started in its own session, with every process it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait()


def cluster_credentials(kind: str, token: str) -> dict[str, str]:
    """What ``eval "$(python cluster/credentials.py KIND)"`` exports on a cluster node with Ray token ``token``."""
    out = subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "cluster" / "credentials.py"),
                          kind], env=dict(os.environ, RAY_AUTH_TOKEN=token), capture_output=True, text=True, check=True)
    return dict(line.removeprefix("export ").split("=", 1) for line in out.stdout.splitlines())


@dataclass
class MlflowServer:
    uri: str
    proc: subprocess.Popen
    root: Path
    client_env: dict[str, str] = field(default_factory=dict)  # what a client needs (credentials)


@contextlib.contextmanager
def mlflow_server(root: Path, auth: bool = False, port: int | None = None,
                  token: str | None = None) -> Iterator[MlflowServer]:
    """``mlflow server`` on 127.0.0.1 (SQLite store, artifacts served through the server, one worker).

    ``auth``: MLflow's basic-auth app with the credentials ``cluster/credentials.py`` derives from a
    fresh Ray token, as cluster.yaml starts it; clients get ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``
    from the same script (``client_env``), never from a file. ``port`` and the Ray ``token`` may be
    chosen beforehand, so that clients can be configured while the server starts.
    """
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
           "--host", LOOPBACK, "--port", str(port), "--workers", "1"]
    client_env: dict[str, str] = {}
    if auth:
        token = token or secrets.token_hex(16)
        ini = root / "basic_auth.ini"
        ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root / 'basic_auth.db'}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), **cluster_credentials("server", token))
        cmd += ["--app-name", "basic-auth"]
        client_env = cluster_credentials("client", token)
    log = root / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = MlflowServer(f"http://{LOOPBACK}:{port}", proc, root, client_env)
    try:
        wait_http(f"{server.uri}/health", proc, log)
        yield server
    finally:
        stop(proc)


@dataclass
class S3Endpoint:
    """A local S3-compatible endpoint (moto's server) with one bucket; ``env`` points clients at it."""

    url: str
    bucket: str
    proc: subprocess.Popen
    env: dict[str, str]

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])


def s3_env(url: str) -> dict[str, str]:
    """What points pyarrow (hence Ray Train and Ray Data) and boto3 at the endpoint ``url``; the
    credentials are placeholders (moto checks none)."""
    return {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@contextlib.contextmanager
def s3_endpoint(root: Path, bucket: str = "vid2vid", port: int | None = None) -> Iterator[S3Endpoint]:
    """moto's S3 server on 127.0.0.1 with one bucket; clients find it through :func:`s3_env`."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = root / "s3.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{LOOPBACK}:{port}"
    env = s3_env(url)
    try:
        wait_http(url, proc, log)
        req = urllib.request.Request(f"{url}/{bucket}", method="PUT")  # create the bucket (moto: no auth check)
        urllib.request.urlopen(req, timeout=10).close()
        yield S3Endpoint(url, bucket, proc, env)
    finally:
        stop(proc)


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block (for in-process clients such as pyarrow's S3)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ray_auth_env() -> dict[str, str]:
    """Token auth on, with the machine's token (``ray get-auth-token --generate`` makes it once)."""
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, capture_output=True, check=True,
                   timeout=60)
    return env


def head_node_args(temp_dir: str, dashboard_port: int, **extra) -> dict:
    """``ray.cluster_utils.Cluster`` head-node arguments: loopback dashboard (the Jobs API), free ports
    for everything the suite's own Ray also uses (agents, metrics, GCS)."""
    return {"temp_dir": temp_dir, "gcs_server_port": free_port(), "include_dashboard": True, "dashboard_host": LOOPBACK,
            "dashboard_port": dashboard_port, "dashboard_agent_listen_port": free_port(),
            "metrics_export_port": free_port(), "runtime_env_agent_port": free_port(), **extra}


# The suite's shared local Ray (conftest.py's ``ray_cluster``): no dashboard, 2 CPUs like CI.
SHARED_RAY_INIT = {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False,
                   "runtime_env": {"env_vars": {"DS_ACCELERATOR": "cpu"}}}


def ray_start_head(temp_dir: str, dashboard_port: int, num_cpus: int = 2) -> list[str]:
    """``ray start --head`` as the job-submission test runs it: the dashboard and Jobs API on 127.0.0.1,
    free ports for what the suite's own Ray also holds (agents, metrics)."""
    return [str(BIN / "ray"), "start", "--head", f"--port={free_port()}", f"--num-cpus={num_cpus}",
            "--include-dashboard=true", f"--dashboard-host={LOOPBACK}", f"--dashboard-port={dashboard_port}",
            f"--temp-dir={temp_dir}", "--disable-usage-stats", f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}"]
