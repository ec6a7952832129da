"""How a program that is given no cluster starts its own Ray: private to this machine, on 127.0.0.1.

Both the shard job and training start one when run on a single machine. Ray decides a node's address
when `ray` is imported: unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, it replaces
`_node_ip_address="127.0.0.1"` with the host's interface address and its servers, agents and metrics
endpoint listen on every interface. Programs import Ray long before they know whether they will start
one, so `start_local_ray` sets the variable (for the processes Ray starts) and Ray's own reading of it.

Ray 2.60 turns token authentication on for a new local Ray and writes the token to ~/.ray/auth_token;
that file is made readable by its owner only.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


def start_local_ray(**init_kwargs) -> None:
    """`ray.init` of a new local Ray bound to 127.0.0.1; `init_kwargs` go to `ray.init` (runtime_env, ...)."""
    import ray
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False   # what Ray read from the variable at import
    ray.init(address="local", _node_ip_address="127.0.0.1", **init_kwargs)
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    with contextlib.suppress(OSError):   # absent, or someone else's (a read-only secret mount): left as it is
        token.chmod(0o600)
