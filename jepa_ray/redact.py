"""What is printed about a job, with its secrets masked.

A job's entrypoint, message, runtime environment and metadata are shown to anyone who can read the
dashboard or the terminal. `redact_text` and `redact` replace by *** the values of secret-looking
NAME=value pairs, --options and keys, bearer tokens, passwords in URLs and environment variables,
and keep the names that only say where a secret is kept (salt_file, RAY_AUTH_TOKEN_PATH).
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
_SECRET_WORD = (
    r"(?:token|secret|passw(?:or)?d|credential|salt|api[_-]?key|private[_-]?key|access[_-]?key|auth)"
)
# a key naming where a secret is, or how it is used, rather than holding it: salt_file, TOKEN_PATH
_WHERE_NOT_WHAT = re.compile(r"[_.-](?:file|path|env|dir|mode)$", re.IGNORECASE)
_ASSIGNED = re.compile(
    rf"(?<![\w.-])(?P<key>[\w.-]*{_SECRET_WORD}[\w.-]*)(?P<sep>=|:\s*)(?P<value>'[^']*'|\"[^\"]*\"|[^\s&,;]+)",
    re.IGNORECASE,
)
_FLAG = re.compile(
    rf"(?<![\w.-])(?P<key>--?[\w.-]*{_SECRET_WORD}[\w.-]*)(?P<sep>\s+)(?P<value>'[^']*'|\"[^\"]*\"|(?!-)\S+)",
    re.IGNORECASE,
)
_BEARER = re.compile(r"(?P<key>\bBearer)(?P<sep>\s+)(?P<value>[^\s\"']+)", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<user>[^/\s@:]+):[^/\s@]+@", re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    """Whether a variable, option or field name says its value is a secret (AWS_SECRET_ACCESS_KEY,
    --salt, password), rather than where one is kept (deid.salt_file, RAY_AUTH_TOKEN_PATH)."""
    return bool(re.search(_SECRET_WORD, key, re.IGNORECASE)) and not _WHERE_NOT_WHAT.search(key)


def redact_text(text: str) -> str:
    """`text` (an entrypoint, a message) with the values of secret-looking NAME=value pairs and
    --options, bearer tokens and passwords in URLs replaced by ***."""

    def mask(m: re.Match) -> str:
        return m.group(0) if not is_secret_key(m["key"]) else f"{m['key']}{m['sep']}{MASK}"

    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    for pattern in (_ASSIGNED, _FLAG):
        text = pattern.sub(mask, text)
    return _BEARER.sub(lambda m: f"{m['key']}{m['sep']}{MASK}", text)


def redact(value: Any, key: str = "") -> Any:
    """A job's runtime_env or metadata as it may be printed: every environment variable's value, and
    the value of every secret-looking key, replaced by ***; strings as `redact_text`."""
    if isinstance(value, dict):
        if key == "env_vars":
            return {k: MASK for k in value}
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, key) for v in value]
    if key and is_secret_key(key) and value not in (None, ""):
        return MASK
    return redact_text(value) if isinstance(value, str) else value
