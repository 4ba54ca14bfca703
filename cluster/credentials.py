"""The MLflow credentials of a cluster, derived from its Ray auth token.

Every node of ``cluster.yaml`` has the cluster's Ray token (``~/.ray/auth_token``, synced from the
machine that ran ``ray up``), so every node computes the same MLflow credentials from it when it
starts, and nothing else has to be generated, stored or sent: the repo never holds a secret, and a
new token (a new cluster) means new credentials. Whoever holds the token can run any code on the
cluster anyway, so the MLflow password adds no weaker link. Standard library only.

    python cluster/credentials.py client   # MLFLOW_TRACKING_USERNAME / _PASSWORD: clients (every node, you)
    python cluster/credentials.py server   # the basic-auth app's admin and its CSRF secret key (the head)

Each prints ``export NAME=value`` lines for ``eval``. The token is read as Ray reads it:
``$RAY_AUTH_TOKEN``, else the file ``$RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shlex
import sys
from pathlib import Path

USERNAME = "vid2vid"


def ray_token() -> str:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not path.is_file():
        sys.exit(f"no Ray auth token at {path}: run `ray get-auth-token --generate` before `ray up`")
    return path.read_text().strip()


def derive(token: str, purpose: str) -> str:
    digest = hmac.new(token.encode(), f"vid2vid/{purpose}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def credentials(kind: str, token: str) -> dict[str, str]:
    password = derive(token, "mlflow-password")
    client = {"MLFLOW_TRACKING_USERNAME": USERNAME, "MLFLOW_TRACKING_PASSWORD": password}
    if kind == "client":
        return client
    if kind == "server":
        return {"MLFLOW_AUTH_ADMIN_USERNAME": USERNAME, "MLFLOW_AUTH_ADMIN_PASSWORD": password,
                "MLFLOW_FLASK_SERVER_SECRET_KEY": derive(token, "mlflow-csrf")}
    sys.exit(f"usage: {sys.argv[0]} client|server")


if __name__ == "__main__":
    kind = sys.argv[1] if len(sys.argv) > 1 else ""
    for name, value in credentials(kind, ray_token()).items():
        print(f"export {name}={shlex.quote(value)}")
