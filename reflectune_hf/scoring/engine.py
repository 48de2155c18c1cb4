"""Mean token losses of a causal LM over many sequences at once: the engine of `IFDScorer`.

A `Span` is a token sequence and the index of its first scored token. `mean_token_losses`
returns, for each span, the mean cross-entropy of its scored tokens given everything before
them, equal to what the model's `labels=` loss gives for that sequence alone, but:

- spans of one `group` that start with the same tokens (the scoring template, the reverse
  prompt) run that shared prefix once; its keys and values are reused, never stored per span;
- the rest is sorted by length and packed into right-padded micro-batches of at most
  `max_tokens` padded tokens, with an attention mask, so a span's loss does not depend on its
  batch-mates;
- the body of the model (`model.base_model`) gives hidden states, and the LM head runs only on
  the positions whose next token is scored, in chunks: no `[batch, seq, vocab]` logits tensor.

`check_model` picks the path for the loaded model once. Both shortcuts reach into transformers'
internals (the body without its head; a KV-cache layer whose class is swapped for one that
serves a batch-1 prefix to any batch), so they run only where `fast_path_allowed` says so: a
transformers version in `FAST_PATH_TRANSFORMERS` and a `config.model_type` in
`FAST_PATH_MODEL_TYPES` (the ones tested), and only when the loaded model's logits check out
as `lm_head(last hidden state)`. Anything else takes the plain path: the model's own forward,
its logits kept only from the first scored position on (`logits_to_keep`), same losses.

Example:
    >>> from reflectune_hf.models import load_causal_lm
    >>> from reflectune_hf.scoring.engine import Span, mean_token_losses
    >>> model, tok = load_causal_lm("smollm2-135m-instruct", device="cpu")
    >>> ids = tok("The cat sat on the mat.")["input_ids"]
    >>> [round(x, 1) > 0 for x in mean_token_losses(model, [Span(ids, start=1)], tok.pad_token_id)]
    [True]
"""

from __future__ import annotations

import functools
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

logger = logging.getLogger(__name__)

MIN_SHARED_PREFIX = 8  # tokens; shorter common prefixes are not worth a separate pass
# Where the fast path (body + head on scored positions, shared prefixes) was tested: transformers
# versions [min, max) and model types. Others take the plain path (same losses, slower).
FAST_PATH_TRANSFORMERS = ("5.0.0", "6.0.0")
FAST_PATH_MODEL_TYPES = frozenset({"llama", "gemma3_text"})
_HEAD_CHUNK_ELEMENTS = 1 << 25  # logits per chunk: at most 32M floats (128 MB in fp32)


@dataclass
class Span:
    """A token sequence whose tokens `ids[start:]` are scored (`start >= 1`)."""

    ids: list
    start: int = 1
    group: Hashable = None  # spans of one group may share a prefix pass
    text: Optional[str] = None  # the text `ids` were cut from (for servers that take text prompts)

    @property
    def n_scored(self) -> int:
        return len(self.ids) - self.start


def mean_loss(token_logprobs: Sequence[float]) -> float:
    """The mean loss of scored tokens from their log-probabilities (summed in float64, as the
    engine sums its cross-entropies): what a served student's answers give for a span.

    Example:
        >>> from reflectune_hf.scoring.engine import mean_loss
        >>> mean_loss([-1.0, -2.0])
        1.5
    """
    if not token_logprobs:
        raise ValueError("no scored token")
    return -math.fsum(float(x) for x in token_logprobs) / len(token_logprobs)


def pack_by_tokens(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices of `lengths` sorted longest first and cut into micro-batches whose padded size
    (rows × longest row) stays within `max_tokens`; a row longer than that goes alone.

    Example:
        >>> from reflectune_hf.scoring.engine import pack_by_tokens
        >>> pack_by_tokens([3, 10, 4, 5], max_tokens=12)
        [[1], [3, 2], [0]]
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _head(model):
    """The output projection with the model's final logit transform (softcapping, if any)."""
    import torch

    head = model.get_output_embeddings()
    if head is None:
        raise NotImplementedError(f"{type(model).__name__} has no output embeddings (lm_head)")
    cap = getattr(model.config, "final_logit_softcapping", None)
    return (lambda h: torch.tanh(head(h) / cap) * cap) if cap else head


def _shared_prefix_length(spans: list[Span]) -> int:
    """Tokens all `spans` start with, leaving each at least its first scored position to run."""
    first = spans[0].ids
    limit = min(min(s.start - 1, len(s.ids) - 1) for s in spans)
    n = 0
    while n < limit and all(s.ids[n] == first[n] for s in spans):
        n += 1
    return n


def _prefix_cache(model, ids: list):
    """Keys and values of `ids` for every layer, in a cache that serves them to any batch size
    without growing (None when the model's cache is not the plain dynamic kind)."""
    import torch
    from transformers.cache_utils import DynamicLayer

    try:
        with torch.inference_mode():
            out = model.base_model(input_ids=torch.tensor([ids], device=model.device), use_cache=True)
        cache = out["cache"] if "cache" in out else out.get("past_key_values")
    except Exception as exc:  # noqa: BLE001 - the spans still run, each with its whole prefix
        logger.warning("Shared-prefix pass failed (%s); running without it", exc)
        return None
    if cache is None or not all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None])):
        return None
    for layer in cache.layers:
        layer.__class__ = _shared_prefix_layer_class()
    return cache


def _cache_argument(model) -> str:
    """The name under which `model.base_model.forward` takes a KV cache: `cache` (transformers
    5.2x and later) or `past_key_values` (before; deprecated since)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.base_model.forward).parameters else "past_key_values"


@functools.lru_cache(maxsize=None)
def _shared_prefix_layer_class():
    from transformers.cache_utils import DynamicLayer

    class SharedPrefixLayer(DynamicLayer):
        """A layer cache holding a batch-1 prefix; `update` prepends it and stores nothing."""

        def update(self, key_states, value_states, *args, **kwargs):
            import torch

            b = key_states.shape[0]
            return (torch.cat([self.keys.expand(b, -1, -1, -1), key_states], dim=-2),
                    torch.cat([self.values.expand(b, -1, -1, -1), value_states], dim=-2))

    return SharedPrefixLayer


def _forward(model, spans: list[Span], pad_id: Optional[int], prefix_len: int = 0, cache=None) -> list[float]:
    """Mean losses of `spans` (all starting with the same `prefix_len` tokens held in `cache`)."""
    import torch
    import torch.nn.functional as F

    device = model.device
    suffixes = [s.ids[prefix_len:] for s in spans]
    ids = torch.full((len(spans), max(map(len, suffixes))), 0 if pad_id is None else pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows, positions = [], []
    for b, (s, suffix) in enumerate(zip(spans, suffixes)):
        ids[b, : len(suffix)] = torch.tensor(suffix)
        mask[b, : len(suffix)] = 1
        rows.append(torch.full((s.n_scored,), b))
        positions.append(torch.arange(s.start - 1, len(s.ids) - 1) - prefix_len)  # state t-1 predicts token t
    rows, positions = torch.cat(rows), torch.cat(positions)
    targets = ids[rows, positions + 1].to(device)
    attention = None
    if not bool(mask.all()):
        attention = torch.cat([torch.ones(len(spans), prefix_len, dtype=torch.long), mask], dim=1).to(device)
    head = _head(model)
    with torch.inference_mode():
        hidden = model.base_model(input_ids=ids.to(device), attention_mask=attention, use_cache=False,
                                  **{_cache_argument(model): cache}).last_hidden_state
        gathered = hidden[rows.to(device), positions.to(device)]  # [scored tokens, hidden size]
        del hidden
        losses = torch.empty(len(targets), dtype=torch.float32, device=device)
        step = max(1, _HEAD_CHUNK_ELEMENTS // model.get_output_embeddings().weight.shape[0])
        for lo in range(0, len(targets), step):
            logits = head(gathered[lo: lo + step]).float()
            losses[lo: lo + step] = F.cross_entropy(logits, targets[lo: lo + step], reduction="none")
        sums = torch.zeros(len(spans), dtype=torch.float64, device=device).index_add_(0, rows.to(device), losses.double())
    counts = torch.tensor([s.n_scored for s in spans], dtype=torch.float64)
    return (sums.cpu() / counts).tolist()


def _forward_plain(model, spans: list[Span], pad_id: Optional[int]) -> list[float]:
    """Mean losses of `spans` from the model's own forward (no shortcut into its internals): right
    padded, logits kept from the first scored position of the batch on (`logits_to_keep`, where
    the model takes it), float32 cross-entropy, summed in float64 like `_forward`."""
    import inspect

    import torch
    import torch.nn.functional as F

    device = model.device
    width = max(len(s.ids) for s in spans)
    ids = torch.full((len(spans), width), 0 if pad_id is None else pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(spans):
        ids[b, : len(s.ids)] = torch.tensor(s.ids)
        mask[b, : len(s.ids)] = 1
    first = min(s.start for s in spans) - 1  # the first position whose logits predict a scored token
    kwargs = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = width - first  # the last width - first positions
    else:
        first = 0
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **kwargs).logits
        sums = []
        for b, s in enumerate(spans):
            rows = logits[b, s.start - 1 - first: len(s.ids) - 1 - first].float()
            target = ids[b, s.start: len(s.ids)].to(device)
            sums.append(F.cross_entropy(rows, target, reduction="none").double().sum().item())
    return [total / s.n_scored for total, s in zip(sums, spans)]


def mean_token_losses(model, spans: list[Span], pad_id: Optional[int], max_tokens: int = 16384,
                      share_prefixes: bool = True, plain: bool = False) -> list:
    """The mean loss of each span's scored tokens: a float, or the exception that its
    micro-batch raised when it was retried alone (one failing span does not stop the others).

    Every span needs `n_scored >= 1`. `plain=True` takes the plain path (the model's own
    forward; no shared prefixes), for models `check_model` does not clear for the fast path.
    """
    out: list = [None] * len(spans)
    groups = defaultdict(list)
    for i, span in enumerate(spans):
        if span.n_scored < 1:
            raise ValueError(f"span {i} has no scored token (start={span.start}, length={len(span.ids)})")
        groups[span.group].append(i)

    for members in groups.values():
        prefix_len, cache = 0, None
        if share_prefixes and not plain and len(members) > 1:
            n = _shared_prefix_length([spans[i] for i in members])
            if n >= MIN_SHARED_PREFIX:
                cache = _prefix_cache(model, spans[members[0]].ids[:n])
                prefix_len = n if cache is not None else 0

        def run(idx: list[int]) -> list:
            try:
                if plain:
                    return _forward_plain(model, [spans[i] for i in idx], pad_id)
                return _forward(model, [spans[i] for i in idx], pad_id, prefix_len, cache)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory: retry one by one
                if len(idx) == 1:
                    return [exc]
                logger.warning("A micro-batch of %d sequences failed (%s); retrying one by one", len(idx), exc)
                return [run([i])[0] for i in idx]

        for batch in pack_by_tokens([len(spans[i].ids) - prefix_len for i in members], max_tokens):
            idx = [members[j] for j in batch]
            for i, value in zip(idx, run(idx)):
                out[i] = value
    return out


def fast_path_allowed(model) -> bool:
    """Whether `model` may take the fast path at all: the installed transformers version lies in
    `FAST_PATH_TRANSFORMERS` and `model.config.model_type` is in `FAST_PATH_MODEL_TYPES`.

    Example:
        >>> from types import SimpleNamespace
        >>> from reflectune_hf.scoring.engine import fast_path_allowed
        >>> fast_path_allowed(SimpleNamespace(config=SimpleNamespace(model_type="unknown-arch")))
        False
    """
    import transformers
    from packaging.version import Version

    low, high = FAST_PATH_TRANSFORMERS
    version_ok = Version(low) <= Version(Version(transformers.__version__).base_version) < Version(high)
    return version_ok and getattr(model.config, "model_type", None) in FAST_PATH_MODEL_TYPES


@dataclass(frozen=True)
class EnginePath:
    """How `mean_token_losses` runs for one model: `plain` (the model's own forward) or the fast
    path, with or without shared-prefix passes. Pass it on as `**path.kwargs()`."""

    plain: bool
    share_prefixes: bool

    def kwargs(self) -> dict:
        return {"plain": self.plain, "share_prefixes": self.share_prefixes}


def check_model(model) -> EnginePath:
    """The path for `model`: plain unless `fast_path_allowed(model)` and its logits are
    `lm_head(last hidden state)`; then shared-prefix passes too when they give the same losses."""
    import math

    import torch

    name = type(model).__name__
    if not fast_path_allowed(model):
        logger.info("%s (%s): plain forward path (fast path tested on transformers %s-%s, %s)", name,
                    getattr(model.config, "model_type", None), *FAST_PATH_TRANSFORMERS, sorted(FAST_PATH_MODEL_TYPES))
        return EnginePath(plain=True, share_prefixes=False)
    ids = list(range(3, 3 + 2 * MIN_SHARED_PREFIX))
    probe = torch.tensor([ids], device=model.device)
    with torch.inference_mode():
        full = model(input_ids=probe).logits[0].float()
        mine = _head(model)(model.base_model(input_ids=probe).last_hidden_state[0]).float()
    if not torch.allclose(full, mine, rtol=1e-3, atol=1e-3 * float(full.abs().max())):
        logger.warning("%s: logits differ from lm_head(last hidden state); plain forward path", name)
        return EnginePath(plain=True, share_prefixes=False)
    spans = [Span(ids, start=MIN_SHARED_PREFIX + 2, group=0), Span(ids[:-1], start=MIN_SHARED_PREFIX + 2, group=0)]
    plain = [_forward(model, [s], None)[0] for s in spans]
    try:
        shared = mean_token_losses(model, spans, None)
    except Exception:  # noqa: BLE001
        return EnginePath(plain=False, share_prefixes=False)
    tolerance = 1e-4 if model.dtype == torch.float32 else 3e-2  # half precision rounds each pass differently
    ok = all(isinstance(b, float) and math.isclose(a, b, rel_tol=tolerance) for a, b in zip(plain, shared))
    if not ok:
        logger.warning("%s: shared-prefix passes disagree with plain ones; disabled", name)
    return EnginePath(plain=False, share_prefixes=ok)
