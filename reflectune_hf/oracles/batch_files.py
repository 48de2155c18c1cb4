"""The Batch API's files and bookkeeping for `oracles.batch.OpenAIBatchOracle`: the limits of one
batch, splitting the request lines into batches, reading a line of an output or error file, and
the cache tables that make a run resumable.

Example:
    >>> from reflectune_hf.oracles.batch_files import read_result_line, split_lines
    >>> split_lines([b"a", b"bb", b"c"], max_requests=2, max_bytes=100)
    [[b'a', b'bb'], [b'c']]
    >>> read_result_line('{"custom_id": "k1", "response": {}}')[0]
    'k1'
"""

from __future__ import annotations

import json
import re
from typing import Optional

from .cache import OracleCache

MAX_REQUESTS_PER_BATCH = 50_000
MAX_BYTES_PER_BATCH = 200 * 1024 * 1024
ENDPOINT = "/v1/chat/completions"
_CUSTOM_ID = re.compile(r'"custom_id"\s*:\s*"([^"\\]+)"')  # read from a line that is not valid JSON


def ensure_batch_tables(cache: OracleCache) -> None:
    """The cache tables that remember submitted batches, their requests and answer shapes."""
    cache.execute("CREATE TABLE IF NOT EXISTS batch_jobs (batch_id TEXT PRIMARY KEY, model TEXT, base_url TEXT, "
                  "input_file_id TEXT, status TEXT, created REAL, done INTEGER NOT NULL DEFAULT 0)")
    cache.execute("CREATE TABLE IF NOT EXISTS batch_requests (key TEXT NOT NULL, batch_id TEXT NOT NULL, "
                  "PRIMARY KEY (key, batch_id))")
    # The answer shape of each structured request, so a JSON answer collected by a later run that
    # no longer asks for it is still cached as the marker text its key stands for.
    cache.execute("CREATE TABLE IF NOT EXISTS batch_formats (key TEXT PRIMARY KEY, answer_format TEXT NOT NULL)")


def read_result_line(line: str) -> tuple[Optional[str], Optional[dict], Optional[str]]:
    """`(custom_id, item, None)` for a good output/error line, `(custom_id or None, None, why)` else."""
    try:
        item = json.loads(line)
    except ValueError as err:
        match = _CUSTOM_ID.search(line)
        return (match.group(1) if match else None), None, f"{type(err).__name__}: {err}"
    if not isinstance(item, dict):
        return None, None, f"a JSON {type(item).__name__}, not an object"
    key = item.get("custom_id")
    if not isinstance(key, str) or not key:
        return None, None, "no custom_id"
    return key, item, None


def batch_failure_reasons(batch) -> str:
    """The service's reasons for a batch that did not complete ("" when it gave none)."""
    data = getattr(getattr(batch, "errors", None), "data", None) or []
    return "; ".join(str(e.message or e.code or "") for e in data)


def split_lines(lines: list[bytes], max_requests: int, max_bytes: int) -> list[list[bytes]]:
    """Consecutive parts of at most `max_requests` lines and `max_bytes` bytes each."""
    parts, current, size = [], [], 0
    for line in lines:
        if len(line) > max_bytes:
            raise ValueError(f"one request is {len(line)} bytes, over the batch limit of {max_bytes}")
        if current and (len(current) >= max_requests or size + len(line) > max_bytes):
            parts.append(current)
            current, size = [], 0
        current.append(line)
        size += len(line)
    return parts + ([current] if current else [])
