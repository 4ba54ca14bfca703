"""What the demo and the tests start listens on 127.0.0.1, except Ray's own node-to-node ports.

Each service is started the way its users start it (``tests/services.py`` is where the tests start
theirs; the demo's Ray is ``ensure_ray()``, as ``experiments/cityscapes.py`` calls it), then every
listening socket of every process they started is looked up (psutil). Servers that read or change
runs or run code (MLflow server and its basic-auth app, the Ray dashboard and Jobs API, the S3
endpoint) must listen on 127.0.0.1 only.

Ray 2.60 binds its own gRPC servers (GCS, raylets, core workers, agents) and its Prometheus metrics
exporters to every interface whatever ``--node-ip-address`` says: it replaces a loopback node address
by the machine's own (``services.resolve_ip_for_localhost``), because other nodes must reach them.
Those are allowed here by process, and the check is that the GCS there refuses a client without the
cluster's token: token authentication is on, also for the demo.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from services import (
    BIN,
    SHARED_RAY_INIT,
    free_port,
    mlflow_server,
    ray_auth_env,
    ray_start_head,
    s3_endpoint,
    stop,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
# Ray's own processes, recognised by their command line, and what their non-loopback ports are
RAY_INTERNAL = {"gcs_server": "GCS", "raylet": "raylet", "ray::": "Ray worker/actor/agent",
                "dashboard/agent.py": "dashboard agent", "runtime_env/agent/main.py": "runtime-env agent",
                "autoscaler/": "autoscaler metrics", "dashboard/dashboard.py": "dashboard metrics (Prometheus)"}

DRIVER = """
import json, os, sys, time
import ray
from vid2vid.platform.trainer import ensure_ray
{init}
print(json.dumps({{"gcs": ray.get_runtime_context().gcs_address}}), flush=True)
sys.stdin.read()
"""


def driver(init: str, env: dict[str, str]) -> subprocess.Popen:
    """A Python process that starts a local Ray as the demo does (``init``) and waits for its stdin."""
    return subprocess.Popen([sys.executable, "-c", DRIVER.format(init=init)], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True)


def tree(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    return []


def processes_of(temp_dir: str) -> list[psutil.Process]:
    """Processes of a `ray start` cluster: everything whose command line names its temp dir."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        if any(temp_dir in c for c in (p.info["cmdline"] or [])):
            out.extend(tree(p.pid))
    return out


def listening(procs: list[psutil.Process]) -> list[tuple[str, int, str]]:
    """(address, port, command line) of every listening TCP socket of ``procs``."""
    pids = {p.pid: p for p in procs}
    out = []
    for c in psutil.net_connections("inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            with contextlib.suppress(psutil.Error):
                out.append((c.laddr.ip, c.laddr.port, " ".join(pids[c.pid].cmdline())))
    return out


def is_loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip.removeprefix("::ffff:")).is_loopback


def ray_kind(cmdline: str) -> str | None:
    for marker, kind in RAY_INTERNAL.items():
        if marker in cmdline:
            return kind
    return "Ray driver (its core worker)" if "vid2vid.platform.trainer import ensure_ray" in cmdline else None


def refused_without_token(gcs: dict[str, str]) -> dict[str, str]:
    """name -> what a client with a wrong token got from each GCS (`ray status`, all at once)."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}
    procs = {name: subprocess.Popen([str(BIN / "ray"), "status", f"--address={address}"], env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for name, address in gcs.items()}
    out = {}
    for name, proc in procs.items():
        text, _ = proc.communicate(timeout=180)
        out[name] = text if proc.returncode != 0 else ""
    return out


def end_driver(proc: subprocess.Popen) -> None:
    """Let a driver shut its Ray down (it exits when its stdin closes), then make sure it is gone."""
    with contextlib.suppress(OSError):
        proc.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=60)
    stop(proc)


def test_services_listen_on_loopback_and_ray_internals_need_the_token(tmp_path):
    env = ray_auth_env()
    temp_dir = tempfile.mkdtemp(prefix="v2vlh", dir="/tmp")
    dash = free_port()
    started: dict[str, list[psutil.Process]] = {}
    http: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        mlflow = stack.enter_context(mlflow_server(tmp_path / "mlflow"))
        mlflow_auth = stack.enter_context(mlflow_server(tmp_path / "mlflow-auth", auth=True))
        s3 = stack.enter_context(s3_endpoint(tmp_path / "s3"))
        # the demo as `make demo` runs it: no RAY_AUTH_MODE set, so token auth is Ray's default here
        demo = driver("ensure_ray()", {k: v for k, v in env.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")})
        shared = driver(f"ray.init(**{SHARED_RAY_INIT!r})", env)
        stack.callback(end_driver, demo)
        stack.callback(end_driver, shared)
        start = ray_start_head(temp_dir, dash, num_cpus=1)
        head = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
        stack.callback(lambda: [p.kill() for p in processes_of(temp_dir) if p.is_running()])
        assert head.returncode == 0, head.stderr[-3000:]
        gcs = {name: json.loads(proc.stdout.readline())["gcs"] for name, proc in (("demo Ray", demo),
                                                                                  ("suite Ray", shared))}
        gcs["ray start --head"] = "127.0.0.1:" + next(a.split("=")[1] for a in start if a.startswith("--port="))
        time.sleep(5)  # agents and metrics exporters come up after ray.init returns

        started = {"mlflow server": tree(mlflow.proc.pid), "mlflow server (basic auth)": tree(mlflow_auth.proc.pid),
                   "S3 endpoint": tree(s3.proc.pid), "demo Ray (ensure_ray)": tree(demo.pid),
                   "suite Ray (conftest)": tree(shared.pid), "ray start --head (job tests)": processes_of(temp_dir)}
        http = {"mlflow server": mlflow.uri, "mlflow server (basic auth)": mlflow_auth.uri, "S3 endpoint": s3.url,
                "Ray dashboard + Jobs API": f"http://127.0.0.1:{dash}"}
        sockets = {name: listening(procs) for name, procs in started.items()}
        exposed_ray: dict[str, set[str]] = {}
        for name, socks in sockets.items():
            assert socks, f"{name}: no listening socket found"
            for ip, port, cmd in socks:
                if is_loopback(ip):
                    continue
                kind = ray_kind(cmd)
                assert kind is not None, f"{name}: {cmd[:120]} listens on {ip}:{port}, beyond 127.0.0.1"
                exposed_ray.setdefault(name, set()).add(kind)
        # the HTTP services themselves: on 127.0.0.1, and the dashboard's Jobs API wants the token too
        for name, url in http.items():
            port = int(url.rsplit(":", 1)[1])
            owners = [(ip, cmd) for socks in sockets.values() for ip, p, cmd in socks if p == port]
            assert owners and all(is_loopback(ip) for ip, _ in owners), (name, owners)
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/jobs/", timeout=10)
        assert denied.value.code in (401, 403)
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"{mlflow_auth.uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
        assert denied.value.code == 401

        # Ray's own exposed ports: the GCS of each cluster refuses a client without its token
        for name, refused in refused_without_token(gcs).items():
            assert "InvalidAuthToken" in refused or "Unauthenticated" in refused, (name, refused[-2000:])
    print("\nRay-internal ports beyond 127.0.0.1 (token-authenticated):",
          {k: sorted(v) for k, v in exposed_ray.items()})
