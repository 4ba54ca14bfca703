"""cluster.yaml: Ray's own cluster-config schema check, and what makes it safe to launch as it is."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
CONFIG = yaml.safe_load((REPO / "cluster.yaml").read_text())
CREDENTIALS = REPO / "cluster" / "credentials.py"


def commands(*sections: str) -> list[str]:
    return [c for s in sections for c in CONFIG.get(s, [])]


def test_cluster_yaml_passes_rays_cluster_config_schema():
    """What ``ray up`` does first with the file: fill in the provider's defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(CONFIG)
    validate_config(prepared)
    assert set(prepared["available_node_types"]) == {"head", "gpu_8x"}
    assert prepared["available_node_types"]["gpu_8x"]["max_workers"] == 2


def test_every_command_is_valid_shell():
    for cmd in commands("setup_commands", "head_setup_commands", "head_start_ray_commands",
                        "worker_start_ray_commands"):
        check = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert check.returncode == 0, f"{cmd}\n{check.stderr}"


def test_uploads_leave_out_what_git_ignores():
    """Ray's rsync gets ``--filter 'dir-merge,- .gitignore'`` (and the exclude of .git) from the file:
    the venv, runs, shards and weights that .gitignore lists never leave the laptop."""
    from ray.autoscaler._private.command_runner import SSHCommandRunner

    args = SSHCommandRunner._create_rsync_filter_args(None, {"rsync_filter": CONFIG["rsync_filter"],
                                                             "rsync_exclude": CONFIG["rsync_exclude"]})
    assert ["--filter", "dir-merge,- .gitignore"] in [args[i:i + 2] for i in range(len(args))]
    assert "**/.git" in args
    ignored = set((REPO / ".gitignore").read_text().split())
    assert {".venv/", "runs/", "*.pt", "*.pth", "*.mp4"} <= ignored


def test_services_are_private_and_authenticated():
    text = (REPO / "cluster.yaml").read_text()
    assert "0.0.0.0" not in text and "RAY_AUTH_MODE=disabled" not in text
    head, workers = " ".join(commands("head_start_ray_commands")), " ".join(commands("worker_start_ray_commands"))
    assert "--dashboard-host=127.0.0.1" in head  # reached through `ray dashboard cluster.yaml` (an SSH tunnel)
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers
    assert CONFIG["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"  # one token, every node
    (server,) = [c for c in commands("head_setup_commands") if "mlflow server" in c]
    assert "--app-name basic-auth" in server and "--serve-artifacts" in server
    assert '--host "$(hostname -I | cut -d\' \' -f1)"' in server  # the head's private address
    assert '--artifacts-destination "$(cat ~/vid2vid-storage)/mlartifacts"' in server  # S3, not the head's disk
    for start in (head, workers):
        assert "credentials.py client" in start and "MLFLOW_TRACKING_URI=" in start
    assert not re.search(r"(?i)password\s*[=:]\s*\S", text)  # no credential in the file


def test_every_node_derives_the_same_credentials_and_a_new_token_changes_them(tmp_path):
    def run(kind: str, **env) -> dict[str, str]:
        out = subprocess.run([sys.executable, str(CREDENTIALS), kind], capture_output=True, text=True, check=True,
                             env={**{k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")},
                                  **env})
        return dict(line.removeprefix("export ").split("=", 1) for line in out.stdout.splitlines())

    token = tmp_path / "auth_token"
    token.write_text("a" * 32 + "\n")
    client = run("client", RAY_AUTH_TOKEN_PATH=str(token))
    server = run("server", RAY_AUTH_TOKEN="a" * 32)  # same token, given the other way Ray takes it
    assert client["MLFLOW_TRACKING_PASSWORD"] == server["MLFLOW_AUTH_ADMIN_PASSWORD"]
    assert client["MLFLOW_TRACKING_USERNAME"] == server["MLFLOW_AUTH_ADMIN_USERNAME"]
    assert len(client["MLFLOW_TRACKING_PASSWORD"]) >= 40 and "a" * 8 not in client["MLFLOW_TRACKING_PASSWORD"]
    assert server["MLFLOW_FLASK_SERVER_SECRET_KEY"] != server["MLFLOW_AUTH_ADMIN_PASSWORD"]
    other = run("client", RAY_AUTH_TOKEN="b" * 32)
    assert other["MLFLOW_TRACKING_PASSWORD"] != client["MLFLOW_TRACKING_PASSWORD"]
    missing = subprocess.run([sys.executable, str(CREDENTIALS), "client"], capture_output=True, text=True,
                             env={"HOME": str(tmp_path / "nohome"), "PATH": os.environ.get("PATH", "")})
    assert missing.returncode != 0 and "ray get-auth-token --generate" in missing.stderr
