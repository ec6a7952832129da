"""Which settings are secrets, and how they are kept out of everything the system writes or prints.

Users hand object-store credentials over in two ways: the environment (AWS_*, GOOGLE_*, ... read by
s3fs, gcsfs and Ray's storage) and fsspec storage options in a recipe (`key`, `secret`, `token`,
`client_kwargs`). Configs, checkpoints, manifests, progress lines and error messages pass through
`redact` (mappings) or `scrub` (text) before they are written. A redacted value reads `REDACTED`; a
config read back drops those entries (`without_redacted`), so the secret comes from the environment
again and the run resumes.
"""
from __future__ import annotations

import os
import re

REDACTED = "<redacted>"
# A mapping key names a secret when it is one of these words or ends in one of them after "_" or "-":
# key, secret, token, password, *_key, aws_access_key_id, session_token, client_secret, credentials.
_SECRET_NAME = re.compile(r"(^|[_-])(key|key_id|secret|token|password|passwd|credentials?)$", re.IGNORECASE)
# Environment variables whose values are secrets (their names follow the same rule).
_STORAGE_ENV = ("AWS_", "FSSPEC_", "GOOGLE_", "GCSFS_", "S3_", "AZURE_")
_MIN_SECRET = 8   # shorter values are no real credential (AWS key ids have 20 characters), and scrubbing
                 # them would cut ordinary words ("test") out of messages


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(str(name)))


def redact(value):
    """A copy of `value` (dicts, lists, tuples, scalars) with every secret-named entry's value REDACTED."""
    if isinstance(value, dict):
        return {k: REDACTED if is_secret_name(k) and v not in (None, "") else redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def without_redacted(value):
    """A copy of `value` without the entries `redact` replaced: what a redacted config is read back as."""
    if isinstance(value, dict):
        return {k: without_redacted(v) for k, v in value.items() if v != REDACTED}
    if isinstance(value, (list, tuple)):
        return type(value)(without_redacted(v) for v in value)
    return value


def secret_values(value, secret: bool = False) -> list[str]:
    """The texts `redact` would hide in `value` (every leaf under a secret-named key), to scrub from messages."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in secret_values(v, secret or is_secret_name(k))]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in secret_values(v, secret)]
    return [str(value)] if secret and value is not None and len(str(value)) >= _MIN_SECRET else []


def secret_env_values(environ=None) -> list[str]:
    """The values of the storage credentials in the environment, longest first."""
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if k.startswith(_STORAGE_ENV) and is_secret_name(k) and len(v) >= _MIN_SECRET}
    return sorted(values, key=len, reverse=True)


def scrub(text: str, secrets: list[str] | None = None) -> str:
    """`text` with every credential value of the environment (or `secrets`) replaced by REDACTED."""
    for secret in sorted(secret_env_values() if secrets is None else secrets, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text
