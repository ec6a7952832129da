"""Every Ray these tests start stays on loopback: without this, Ray 2.60 registers a local node under the
host's interface address (and Ray Train hands that address to torch.distributed)."""
import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
