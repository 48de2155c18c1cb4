"""What may leave this machine of a configuration: no secrets, no local paths.

`sanitize_config` is for `reflectune_config.json` (it stays local and reproduces the run):
secret-named keys dropped (`is_secret_key`: `api_key`, `*_key`, `*token` but not `*_tokens*`,
`secret`, `password`, `bearer`...), URLs without user, password and secret query parameters,
everything else kept. `sanitize_context` is for cards (published): the same, and local paths
reduced to a name (`public_name`).

Example:
    >>> from reflectune_hf.sanitize import sanitize_config
    >>> sanitize_config({"hf_token": "x", "max_new_tokens": 8})
    {'max_new_tokens': 8}
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# Secret-named keys: `api_key`, `*_key`, `*token` (not `max_new_tokens`, `tokens_per_minute`...), `bearer`...
SECRET_KEY = re.compile(r"(^|[_.-])(api[_-]?key|key|secret|password|passwd|bearer|authorization|credentials?)$"
                        r"|token$|^bearer", re.I)
LOCAL_PREFIX = "local:"  # an oracle run here: `local:<model>`


def host_only(url: str) -> str:
    """The host (and port) of a URL, without user, password, path or query.

    Example:
        >>> from reflectune_hf.sanitize import host_only
        >>> host_only("https://user:sk-secret@api.example.com:8443/v1?key=abc")
        'api.example.com:8443'
    """
    parts = urlsplit(url if "//" in url else f"//{url}")
    host = parts.hostname or ""
    return f"{host}:{parts.port}" if parts.port else host


def is_secret_key(key: str) -> bool:
    """Whether a configuration key names a secret (its value never reaches a file or a card).

    Example:
        >>> from reflectune_hf.sanitize import is_secret_key
        >>> [k for k in ("api_key", "OPENAI_API_KEY", "hf_token", "bearer", "password", "max_new_tokens",
        ...              "tokens_per_minute", "max_tokens_per_batch", "tokenizer") if is_secret_key(k)]
        ['api_key', 'OPENAI_API_KEY', 'hf_token', 'bearer', 'password']
    """
    return bool(SECRET_KEY.search(str(key)))


def strip_url_secrets(url: str) -> str:
    """A URL without its user and password and without secret-named query parameters; the
    scheme, host, port and path stay (`http://127.0.0.1:8000/v1` reproduces a run).

    Example:
        >>> from reflectune_hf.sanitize import strip_url_secrets
        >>> strip_url_secrets("https://user:sk-1@api.example.com:8443/v1?api-key=sk-1&region=eu")
        'https://api.example.com:8443/v1?region=eu'
    """
    parts = urlsplit(url)
    if not parts.netloc:
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    netloc += f":{parts.port}" if parts.port else ""
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not is_secret_key(k)])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _is_url(key: str, value) -> bool:
    return isinstance(value, str) and (str(key).endswith("url") or bool(re.match(r"^[a-z][a-z0-9+.-]*://", value)))


def sanitize_config(config: Optional[Mapping[str, Any]]) -> dict:
    """A configuration without secrets, for `reflectune_config.json`: secret-named keys dropped
    (`is_secret_key`), URLs without user, password and secret query parameters. Everything else
    is kept as it is, local paths included, so the file reproduces the run
    (`reflectune recycle --config <out>/reflectune_config.json`).

    Example:
        >>> from reflectune_hf.sanitize import sanitize_config
        >>> sanitize_config({"base_url": "http://u:p@127.0.0.1:8000/v1", "api_key": "sk-1", "max_new_tokens": 64})
        {'base_url': 'http://127.0.0.1:8000/v1', 'max_new_tokens': 64}
    """
    if config is not None and not isinstance(config, Mapping):
        raise TypeError(f"the configuration (card_context) must be a mapping of settings, e.g. {{'oracle_model': "
                        f"'gpt-4o-mini'}}, got a {type(config).__name__}: pass a Hub id as repo_id=")
    clean = {}
    for key, value in (config or {}).items():
        if not is_secret_key(key):
            clean[str(key)] = _clean_value(key, value)
    return clean


def _clean_value(key, value):
    """`value` of `key` cleaned: a URL stripped of secrets, a mapping by `sanitize_config`, a list or
    tuple item by item (an item takes its list's key: a list of `*_url` holds URLs)."""
    if _is_url(key, value):
        return strip_url_secrets(value)
    if isinstance(value, Mapping):
        return sanitize_config(value)
    if isinstance(value, (list, tuple)):
        items = [_clean_value(key, item) for item in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def _looks_local(text: str) -> bool:
    return text.startswith(("/", "~", "./", "../", ".\\")) or os.path.exists(os.path.expanduser(text))


def public_name(value: str) -> str:
    """How a card names a dataset or model: a Hub id or alias as it is; a local file by its name
    (`my.jsonl (local file)`), a local directory by its folder name (`local data` when it has
    none); `local:<path>` keeps its prefix. A card never shows a local path.

    Example:
        >>> from reflectune_hf.sanitize import public_name
        >>> public_name("/home/me/data/my.jsonl"), public_name("tatsu-lab/alpaca"), public_name("local:/srv/m/")
        ('my.jsonl (local file)', 'tatsu-lab/alpaca', 'local:m')
    """
    text = str(value)
    if text.startswith(LOCAL_PREFIX):
        return LOCAL_PREFIX + public_name(text[len(LOCAL_PREFIX):])
    if not _looks_local(text):
        return text
    path = Path(os.path.expanduser(text))
    if path.suffix and not path.is_dir():
        return f"{path.name} (local file)"
    return path.resolve().name or "local data"


def sanitize_context(context: Optional[Mapping[str, Any]]) -> dict:
    """The card context: `sanitize_config` (no secrets), and local paths reduced to a name
    (`public_name`).

    Example:
        >>> from reflectune_hf.sanitize import sanitize_context
        >>> sanitize_context({"oracle_base_url": "http://u:p@127.0.0.1:8000/v1", "api_key": "sk-1",
        ...                   "source_dataset": "/tmp/rows.jsonl"})
        {'oracle_base_url': 'http://127.0.0.1:8000/v1', 'source_dataset': 'rows.jsonl (local file)'}
    """
    return {key: _public(key, value) for key, value in sanitize_config(context).items()}


def _public(key, value):
    """A sanitized value as a card shows it: local paths reduced to a name, in lists and mappings too."""
    if isinstance(value, str) and not _is_url(key, value):
        return public_name(value)
    if isinstance(value, Mapping):
        return sanitize_context(value)
    if isinstance(value, list):
        return [_public(key, item) for item in value]
    return value


def is_hub_id(name: Optional[str]) -> bool:
    """Whether `name` has the form of a Hub repo id (`name` or `owner/name`: letters, digits, `_.-`).

    Example:
        >>> from reflectune_hf.sanitize import is_hub_id
        >>> is_hub_id("tatsu-lab/alpaca"), is_hub_id("my.jsonl (local file)")
        (True, False)
    """
    return bool(name) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None
