"""Small shared helpers: the cache root, stable hashing, and picklable lazy state.

Nothing here imports another module of the package, so every module may import it.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import gc
import hashlib
import importlib
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

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
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file at that path, or a folder we may not write
        where = f"${CACHE_ENV}={root}" if os.environ.get(CACHE_ENV) else str(root)
        raise NotADirectoryError(f"The reflectune_hf cache {where} cannot be a folder ({err.strerror or err}): "
                                 f"point ${CACHE_ENV} at a folder you can write") from None
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


@contextlib.contextmanager
def torch_threads(n: Optional[int]):
    """Run the block with `torch.set_num_threads(n)` and restore the previous count after it
    (also on an error); `n=None` changes nothing. The count is process-wide while the block runs,
    so threads that run torch work at the same time see it too.

    Example:
        >>> import torch
        >>> from reflectune_hf.utils import torch_threads
        >>> before = torch.get_num_threads()
        >>> with torch_threads(1):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


def package_version() -> str:
    """`reflectune_hf.__version__`, read when called (so a fingerprint follows the installed package).

    Example:
        >>> import reflectune_hf
        >>> from reflectune_hf.utils import package_version
        >>> package_version() == reflectune_hf.__version__
        True
    """
    package = sys.modules.get(__name__.rpartition(".")[0]) or importlib.import_module(__name__.rpartition(".")[0])
    return str(package.__version__)


def id_problem(ids) -> str:
    """What makes a column of row ids unusable, or `""`: a missing value (None or NaN: NaN is
    unequal to itself, so a set would count every NaN as a distinct id) or a repeated value.

    Example:
        >>> from reflectune_hf.utils import id_problem
        >>> id_problem([3, 5]), id_problem([3, None, float("nan")]), id_problem([3, 3])
        ('', 'has missing values (None or NaN) at row(s) [1, 2]', 'values are not unique: [3] repeat')
    """
    ids = list(ids)
    missing = [i for i, value in enumerate(ids) if value is None or value != value]
    if missing:
        return f"has missing values (None or NaN) at row(s) {missing[:5]}"
    repeated = [value for value, n in collections.Counter(ids).items() if n > 1]
    return f"values are not unique: {repeated[:5]} repeat" if repeated else ""


def dataset_from_records(records):
    """An in-memory `Dataset` of a list of dicts with every key of any record (a record without one
    gets None there); `Dataset.from_list` keeps only the first record's keys.

    Example:
        >>> from reflectune_hf.utils import dataset_from_records
        >>> dataset_from_records([{"a": 1}, {"a": 2, "b": "x"}]).to_dict()
        {'a': [1, 2], 'b': [None, 'x']}
    """
    from datasets import Dataset

    keys = dict.fromkeys(k for r in records for k in r)
    return Dataset.from_dict({k: [r.get(k) for r in records] for k in keys})


IDENTITY_KEY = "__reflectune_hf_identity__"  # the pickled state's entry that only identifies the code


class LazyState:
    """Mixin for pipeline callables that hold heavy or unpicklable runtime state.

    Attributes named in `_transient` (a loaded model, an HTTP client, a SQLite connection, usage
    counters, knobs that change speed but not results) are left out of the pickled state, and
    `fingerprint_identity()` (the package version; subclasses add e.g. the weights' identity) is
    put in. Consequences, all wanted:

    - `datasets` fingerprints a `map` function by pickling it, so the fingerprint depends on the
      configuration and the code's version only and is the same in every process: a repeated
      `map` is served from the cache without loading anything, and an upgrade of the package
      (which may fix a stage) or new weights compute the rows again.
    - `map(..., num_proc=N)` ships the callable to worker processes without the model or client;
      each worker rebuilds its own lazily on first use.

    Subclasses set `_transient` and create those attributes lazily (after unpickling they are
    `None`, or their value in `_transient_defaults`: a runtime knob such as a batch size or a
    device is then the default in a `num_proc` worker).
    """

    _transient: ClassVar[tuple[str, ...]] = ()
    _transient_defaults: ClassVar[dict] = {}

    def fingerprint_identity(self) -> dict:
        """What identifies the code and models behind this callable, beyond its configuration:
        hashed by datasets with the pickled state, dropped when unpickled."""
        return {"reflectune_hf": package_version()}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for name in self._transient:
            state.pop(name, None)
        state[IDENTITY_KEY] = self.fingerprint_identity()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({k: v for k, v in state.items() if k != IDENTITY_KEY})
        for name in self._transient:
            self.__dict__.setdefault(name, self._transient_defaults.get(name))


def _versioned_from(module: str, qualname: str, version: str):
    """Unpickle a `VersionedFunction`: the module's object of that name (`version` only identifies)."""
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


class VersionedFunction:
    """A module-level function for `Dataset.map` / `filter` that datasets hashes with the package
    version: its pickled form is its module, its name and `reflectune_hf.__version__`, so an
    upgrade that changes what it computes is not served rows of the old version from the cache,
    while the fingerprint stays the same in every process of one version.

    Use it as the decorator `@versioned`; the function keeps its name, docstring and signature.

    Example:
        >>> from datasets.fingerprint import Hasher
        >>> from reflectune_hf.reflection.extract import extract_response_reflection
        >>> type(extract_response_reflection).__name__, extract_response_reflection.__name__
        ('VersionedFunction', 'extract_response_reflection')
        >>> Hasher.hash(extract_response_reflection) == Hasher.hash(extract_response_reflection)
        True
    """

    def __init__(self, func: Callable):
        self.__func__ = func
        functools.update_wrapper(self, func)

    def __call__(self, *args, **kwargs):
        return self.__func__(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<versioned function {self.__module__}.{self.__qualname__}>"

    def __reduce__(self):
        return _versioned_from, (self.__module__, self.__qualname__, package_version())


def versioned(func: Callable) -> VersionedFunction:
    """Decorator: `func` as a `VersionedFunction` (hashed by datasets with the package version).

    Example:
        >>> from reflectune_hf.utils import versioned
        >>> @versioned
        ... def shout(batch):
        ...     "Upper-case the text."
        ...     return {"text": [t.upper() for t in batch["text"]]}
        >>> shout({"text": ["hi"]}), shout.__doc__
        ({'text': ['HI']}, 'Upper-case the text.')
    """
    return VersionedFunction(func)


def card_template(name: str) -> Path:
    """Path of a card template (`dataset_card.md`, `model_card.md`). The templates live in the
    repository's top-level `cards/`; `reflectune_hf/cards` links to it, so a wheel carries them as
    package data and a checkout, an editable install and a wheel (`pip install --target` included)
    find them in the same place.

    Example:
        >>> from reflectune_hf.utils import card_template
        >>> card_template("dataset_card.md").name
        'dataset_card.md'
    """
    path = Path(__file__).resolve().parent / "cards" / name
    if not path.is_file():
        raise FileNotFoundError(f"Card template {name!r} not found at {path}: the package's cards/ is incomplete; "
                                "reinstall reflectune_hf")
    return path
