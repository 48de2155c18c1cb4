"""Small shared helpers: the cache root, stable hashing, and picklable lazy state.

Nothing here imports another module of the package, so every module may import it.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, ClassVar

CACHE_ENV = "REFLECTUNE_HF_CACHE"


def cache_root() -> Path:
    """The directory for converted models and the oracle cache.

    `$REFLECTUNE_HF_CACHE` when set, else `~/.cache/reflectune_hf`. The directory is created on
    first use.

    Example:
        >>> from reflectune_hf.utils import cache_root
        >>> cache_root().is_dir()
        True
    """
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "reflectune_hf").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


_gc_lock = threading.Lock()  # guards the two below
_gc_pauses = 0  # blocks inside `gc_paused` now, in all threads
_gc_was_enabled = False  # the collector's state when the first of them began


@contextlib.contextmanager
def gc_paused():
    """Pause Python's cyclic garbage collector inside the block; its previous state comes back after.

    Reference counting still frees memory at once; only the search for reference cycles waits.
    Nested and concurrent blocks share one pause, restored when the last one ends. Use it around
    work that creates many long-lived objects (imports, model loading), which the collector would
    otherwise scan again and again as the heap grows.

    Example:
        >>> import gc
        >>> from reflectune_hf.utils import gc_paused
        >>> with gc_paused():
        ...     gc.isenabled()
        False
        >>> gc.isenabled()
        True
    """
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hex SHA-256 of the canonical JSON form of `obj` (sorted keys, no whitespace).

    The same value gives the same hash in every process and every Python version, unlike
    `hash()`.

    Example:
        >>> from reflectune_hf.utils import stable_hash
        >>> stable_hash({"b": 1, "a": [1, 2]}) == stable_hash({"a": [1, 2], "b": 1})
        True
    """
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


class LazyState:
    """Mixin for pipeline callables that hold heavy or unpicklable runtime state.

    Attributes named in `_transient` (a loaded model, an HTTP client, a SQLite connection, usage
    counters) are left out of the pickled state. Two consequences, both wanted:

    - `datasets` fingerprints a `map` function by pickling it, so the fingerprint depends on the
      configuration only and is the same in every process: a repeated `map` is served from the
      cache without loading anything.
    - `map(..., num_proc=N)` ships the callable to worker processes without the model or client;
      each worker rebuilds its own lazily on first use.

    Subclasses set `_transient` and create those attributes lazily (they are `None` after
    unpickling).
    """

    _transient: ClassVar[tuple[str, ...]] = ()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for name in self._transient:
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        for name in self._transient:
            self.__dict__.setdefault(name, None)


def card_template(name: str) -> Path:
    """Path of a card template (`dataset_card.md`, `model_card.md`) from the repository's `cards/`.

    Looked up in the source checkout first (editable installs), then where a wheel installs
    `cards/` (`<prefix>/share/reflectune_hf/cards`, see `data_files` in setup.cfg).

    Example:
        >>> from reflectune_hf.utils import card_template
        >>> card_template("dataset_card.md").name
        'dataset_card.md'
    """
    import sys

    candidates = [
        Path(__file__).resolve().parents[1] / "cards" / name,
        Path(sys.prefix) / "share" / "reflectune_hf" / "cards" / name,
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"Card template {name!r} not found in {[str(p) for p in candidates]}")
