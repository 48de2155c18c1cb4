"""The embedded oracle's decode loop: one prefill, then one token per step for the rows still running.

`decode` is what `TransformersOracle` runs instead of `model.generate`. Against `generate` it
removes finished rows from the batch (their KV cache rows are dropped, so a batch of short
answers does not keep paying for its longest one), reports each row the moment it ends (the
oracle's progress bar and cache advance per request, not per batch), gives every row its own
token budget (`min(max_tokens, context - prompt)`), prefills a prompt once for its `n` sampled
choices, and applies a per-row token mask from a constraint (`LocalConstraint`) to the logits
before choosing. The forward pass itself is the model's own (`model(...)` with a
`DynamicCache`), in the model's dtype, so greedy text is what `generate` gives for the same
batch in fp32.

Sampling follows `generate(do_sample=True, top_k=0)`: logits / temperature, then nucleus
filtering (the smallest set of tokens whose probability reaches `top_p`, at least one), then one
draw. A seeded call draws from its own `torch.Generator`, so the global random state is left
alone and the same seed gives the same sample. Log-probabilities are the model's own (before
temperature and before any constraint mask).

Constrained decoding uses llguidance (PyPI `llguidance`, no dependencies, a 3 MB abi3 wheel):
on the reflection shapes of `stage_formats` at 192 tokens with the SmolLM2 tokenizer (a busy
2-core machine) it builds a matcher in ~2 ms and computes a mask in ~0.25 ms per token, lazily,
so the shapes' long bounded repetitions cost nothing up front; the llguidance tokenizer is built
once per process (~1.5 s) with token groups for the shapes' free text (`ANSWER_SLICES`: the same
masks, 1.51 -> 0.25 ms a mask; in the llama.cpp oracle's steps of 6.4 rows 7.6 -> 1.9 ms).
The others were not a fit: outlines-core's `Vocabulary.from_pretrained`
downloads `tokenizer.json` by Hub id (a local model directory fails offline) and compiles the
whole regex into a token index before the first token; xgrammar requires triton and
apache-tvm-ffi (hundreds of MB on a CPU-only install). llguidance also takes Lark/GBNF grammars
and JSON schemas, should a shape need them. Measured end to end by
`scripts/bench_local_oracle.py`: constrained / unconstrained time per token at equal answer
lengths 1.04 (llama.cpp, one thread, load 2).

Example:
    >>> from reflectune_hf.models import load_causal_lm
    >>> from reflectune_hf.oracles.local_decode import decode
    >>> model, tok = load_causal_lm("smollm2-135m-instruct")
    >>> ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    >>> rows = []
    >>> decode(model, [tok(ids, add_special_tokens=False)["input_ids"]], [4], eos={tok.eos_token_id},
    ...        pad_id=tok.pad_token_id, on_row=lambda p, c, ids, reason, lp: rows.append((p, len(ids), reason)))
    >>> rows[0][0], rows[0][1] <= 4
    (0, True)
"""

from __future__ import annotations

import inspect
import logging
from typing import Callable, Optional, Sequence, Union

from .base import OracleConfigurationError

logger = logging.getLogger(__name__)


# llguidance's "slices": token groups whose whole group a mask step admits at once when the grammar
# allows any text of the slice there, instead of walking every token. The default ones are made
# for JSON strings (no `"` or `\\`); the answer shapes' free text is "no bracket, no `#`" (see
# `structured`), so these groups cover it. The masks are the same (tested); only their cost
# changes: 1.51 -> 0.25 ms a step on the reflection shapes (busy 2-core machine, load 6).
_TEXT = r"[^\[\]#\x00-\x08\x0B-\x1F\x7F]"
ANSWER_SLICES = (r"[\x20\x0A\x0D\x09]+", _TEXT + "{1,10}", _TEXT + "{1,30}", _TEXT + "+")


class LocalConstraint:
    """The token mask of one answer shape for one tokenizer, through llguidance.

    Args:
        tokenizer: a fast Hugging Face tokenizer (its llguidance form is built once, ~1.5 s,
            and shared by every constraint on the same tokenizer object).
        regex: the regular expression the whole answer must match (`AnswerFormat.regex()`).

    `matcher()` gives a fresh matcher for one answer; `mask(matcher)` its allowed tokens as a
    bool tensor (EOS allowed only once the answer is complete).
    """

    _tokenizers: dict = {}

    def __init__(self, tokenizer, regex: str):
        try:
            import llguidance
            import llguidance.hf
        except ImportError as err:
            raise ImportError("constrained decoding in TransformersOracle needs llguidance: "
                              "pip install 'llguidance>=1.0'") from err
        self._llg = llguidance
        key = id(tokenizer)
        if key not in self._tokenizers:
            self._tokenizers[key] = (tokenizer, llguidance.hf.from_tokenizer(tokenizer, slices=list(ANSWER_SLICES)))
        self.ll_tokenizer = self._tokenizers[key][1]
        self.grammar = llguidance.LLMatcher.grammar_from_regex(regex)
        probe = self.matcher()
        if probe.is_error():
            raise ValueError(f"llguidance cannot compile the answer format: {probe.get_error()}")

    def matcher(self):
        return self._llg.LLMatcher(self.ll_tokenizer, self.grammar)

    @staticmethod
    def mask(matcher, vocab: int):
        import numpy as np
        import torch

        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = np.zeros(vocab, dtype=bool)
        n = min(vocab, bits.shape[0])
        allowed[:n] = bits[:n].astype(bool)
        return torch.from_numpy(allowed)


def request_constraint(constraints: dict, request, tokenizer, structured: str):
    """The `LocalConstraint` enforcing `request.answer_format` (one per shape, kept in `constraints`),
    or None: no format, `structured="off"`, or llguidance missing with `structured="auto"` (logged;
    `"on"` raises `OracleConfigurationError`)."""
    shape = request.answer_format
    if shape is None or structured == "off":
        return None
    if shape not in constraints:
        try:
            constraints[shape] = LocalConstraint(tokenizer, shape.regex())
        except ImportError as err:
            if structured == "on":
                raise OracleConfigurationError(f"structured='on': {err}") from err
            logger.warning("%s; answers are free text (structured='auto')", err)
            constraints[shape] = None
    return constraints[shape]


def prompt_ids(tokenizer, requests) -> list:
    """Per request, the token ids of its prompt (the tokenizer's chat template), or, where the
    template cannot render it (a content-part list, an assistant turn without content), a
    one-line error for that row alone: the other requests of the call are answered."""
    ids = []
    for request in requests:
        try:
            text = tokenizer.apply_chat_template(request.message_dicts, add_generation_prompt=True, tokenize=False)
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        except Exception as err:  # noqa: BLE001 - jinja2's errors, a template's raise_exception
            ids.append(f"the model's chat template cannot render this request: {type(err).__name__}: {err}")
    return ids


def _cache_kwarg(model) -> str:
    """`cache` (transformers >= 5.2x) or `past_key_values` (older), as the model's forward takes it."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _choose(logits, greedy: bool, temperature: float, top_p: float, generators: Sequence):
    """One token per row: argmax, or a draw after temperature and nucleus filtering. A sampled
    row draws from its prompt's generator (`generators[a]`, shared by the copies of one prompt,
    which draw together), or from the global random state where it is None."""
    import torch

    if greedy:
        return logits.argmax(-1)
    scaled = logits / temperature
    if top_p < 1.0:
        ordered, order = scaled.sort(dim=-1, descending=False)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= (1 - top_p)
        drop[..., -1] = False  # keep at least the most likely token
        scaled = scaled.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    probs = scaled.softmax(-1)
    chosen = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    groups: dict = {}
    for a, generator in enumerate(generators):
        groups.setdefault(id(generator), (generator, []))[1].append(a)
    for generator, rows in groups.values():
        index = torch.tensor(rows, dtype=torch.long, device=probs.device)
        chosen[index] = torch.multinomial(probs[index], 1, generator=generator).squeeze(-1)
    return chosen


def decode(model, prompts: Sequence[Sequence[int]], budgets: Sequence[int], *, eos: set, pad_id: int,
           greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0,
           seed: Union[None, int, Sequence[Optional[int]]] = None,
           copies: int = 1, top_logprobs: Optional[int] = None,
           constraints: Optional[Sequence[Optional[LocalConstraint]]] = None,
           on_row: Callable = lambda p, c, ids, reason, logprobs: None) -> None:
    """Generate for `prompts` (token ids) sharing one sampling setting; report rows as they end.

    Args:
        prompts: token ids per prompt (any lengths; left-padded here).
        budgets: new tokens allowed per prompt (>= 1).
        eos: token ids that end an answer (not part of it).
        greedy, temperature, top_p: the sampling setting (see the module docstring).
        seed: None (the global random state), or a seed for all prompts or one per prompt (None
            entries allowed): each seeded prompt draws from its own generator, so its sample
            does not depend on the other prompts of the batch (prompts with different seeds
            share a batch).
        copies: choices per prompt (sampled; the prompt is prefilled once).
        top_logprobs: None for no log-probabilities, else the number of alternatives per token.
        constraints: per prompt, a `LocalConstraint` or None.
        on_row: `on_row(prompt_index, copy_index, token_ids, finish_reason, logprobs)` once per
            row, as soon as it ends; `logprobs` is a list of `(token, logprob, [(alt, logprob)])`
            or None.
    """
    import torch
    from transformers import DynamicCache

    batch, longest = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, longest), dtype=torch.long)
    for i, ids in enumerate(prompts):
        input_ids[i, longest - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
        attention[i, longest - len(ids):] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    cache_kw = _cache_kwarg(model)
    device = model.device
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * batch
    if len(seeds) != batch:
        raise ValueError(f"decode: {len(seeds)} seeds for {batch} prompts")
    generators = [torch.Generator(device=device).manual_seed(s) if (s is not None and not greedy) else None
                  for s in seeds]

    with torch.inference_mode():
        out = model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                    position_ids=positions.to(device), use_cache=True, logits_to_keep=1, **{cache_kw: cache})
        logits = out.logits[:, -1, :].float()
        next_pos = attention.sum(-1).to(device)
        attention = attention.to(device)
        if copies > 1:
            cache.batch_repeat_interleave(copies)
            logits = logits.repeat_interleave(copies, 0)
            next_pos = next_pos.repeat_interleave(copies, 0)
            attention = attention.repeat_interleave(copies, 0)
        rows = [(p, c) for p in range(batch) for c in range(copies)]
        constraints = list(constraints) if constraints is not None else [None] * batch
        matchers = [constraints[p].matcher() if constraints[p] is not None else None for p, _ in rows]
        produced: list[list[int]] = [[] for _ in rows]
        logprobs: list[Optional[list]] = [[] if top_logprobs is not None else None for _ in rows]
        active = list(range(len(rows)))
        vocab = logits.shape[-1]
        while active:
            raw = logits
            if any(matchers[r] is not None for r in active):
                allowed = torch.ones((len(active), vocab), dtype=torch.bool)
                for a, r in enumerate(active):
                    if matchers[r] is not None:
                        allowed[a] = LocalConstraint.mask(matchers[r], vocab)
                logits = raw.masked_fill(~allowed.to(raw.device), float("-inf"))
            chosen = _choose(logits, greedy, temperature, top_p, [generators[rows[r][0]] for r in active])
            if top_logprobs is not None:
                model_lp = raw.log_softmax(-1)
                picked = model_lp.gather(-1, chosen[:, None]).squeeze(-1).tolist()
                tops = model_lp.topk(top_logprobs, dim=-1) if top_logprobs else None
            tokens = chosen.tolist()
            keep = []
            for a, r in enumerate(active):
                token, reason = tokens[a], None
                if token in eos:
                    reason = "stop"
                else:
                    produced[r].append(token)
                    if logprobs[r] is not None:
                        alts = (list(zip(tops.indices[a].tolist(), tops.values[a].tolist())) if tops is not None
                                else [])
                        logprobs[r].append((token, picked[a], alts))
                    matcher = matchers[r]
                    if matcher is not None and (not matcher.consume_token(token) or matcher.is_stopped()):
                        reason = "stop"
                    elif len(produced[r]) >= budgets[rows[r][0]]:
                        reason = "length"
                if reason is None:
                    keep.append(a)
                else:
                    on_row(rows[r][0], rows[r][1], produced[r], reason, logprobs[r])
            if not keep:
                break
            if len(keep) < len(active):  # finished rows leave the batch (and the KV cache)
                index = torch.tensor(keep, dtype=torch.long, device=device)
                cache.batch_select_indices(index)
                attention, next_pos, chosen = attention[index], next_pos[index], chosen[index]
                active = [active[a] for a in keep]
            attention = torch.cat([attention, attention.new_ones((len(active), 1))], dim=-1)
            out = model(input_ids=chosen[:, None], attention_mask=attention, position_ids=next_pos[:, None],
                        use_cache=True, **{cache_kw: cache})
            next_pos = next_pos + 1
            logits = out.logits[:, -1, :].float()
