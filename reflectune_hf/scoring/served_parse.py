"""Requests to, and answers from, a served student: the completions endpoint's log-probabilities
turned into per-token log-probabilities aligned with the local tokenisation (pure functions).

Two shapes (the request bodies are built here too, so tests can assert them exactly):

- vLLM (`vllm_prompt_body`): the prompt as token ids, `prompt_logprobs=1`, `max_tokens=1`. The
  answer's `choices[0].prompt_logprobs` has one entry per prompt token: None for the first, then
  `{"<token id>": {"logprob", "rank", "decoded_token"}}`, which always holds the prompt token
  itself. The tokens are exactly ours: nothing is re-tokenised.
- OpenAI-legacy / llama.cpp (`echo_body`): the prompt as text, `echo=True`, `logprobs=1`,
  `max_tokens=1` (llama-cpp-python reads `max_tokens=0` as "until the context is full"). The
  answer's `choices[0].logprobs` has `tokens`, `text_offset` and `token_logprobs` (None for the
  first token) of the server's own tokenisation, and the generated token after the prompt.
  `echo_logprobs` maps them onto the local tokens by their character ends: the scored local
  tokens must be exactly the server's tokens over the same characters, else the span is
  `misaligned` (a tokenizer that differs from the server's: another vocabulary or
  normalisation, a GGUF tokenizer that merges differently, a character split across byte
  tokens). The context before the scored tokens may be tokenised differently. (llama-cpp-python
  pairs these values one position off without a leading BOS: `scoring.served_llamacpp` reads
  its answers shifted, with `align_echo`.)

SelectIT reads the next-token distribution after a prompt (`top_body`, `logprobs=k`): the
top-k of the generated token, keyed `"token_id:<id>"` on vLLM (`return_tokens_as_token_ids`)
and by decoded text elsewhere. A rating token outside the returned top-k is reported, never
guessed (`RatingsOutsideTopK`).

Example:
    >>> from reflectune_hf.scoring.served_parse import vllm_prompt_logprobs
    >>> choice = {"prompt_logprobs": [None, {"7": {"logprob": -0.5, "rank": 1}}, {"9": {"logprob": -2.0}}]}
    >>> vllm_prompt_logprobs(choice, [5, 7, 9], start=1)
    [-0.5, -2.0]
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from ..oracles.base import OracleConfigurationError

TOKEN_ID_PREFIX = "token_id:"  # vLLM's rendering of a token with return_tokens_as_token_ids


class ServedProblem(ValueError):
    """A span or prompt whose answer cannot give its log-probabilities; `status` names the
    reason as the row's status word (`misaligned`, `missing_logprob`, `rating_outside_top_k`)."""

    def __init__(self, status: str, detail: str):
        super().__init__(detail)
        self.status = status


class NoPromptLogprobs(RuntimeError):
    """The server answered without prompt log-probabilities: it cannot score at all."""


class StudentServerError(OracleConfigurationError):
    """The served student cannot score at all (unreachable, refused, no prompt log-probabilities)."""


class RequestFailed(RuntimeError):
    """One request failed after the retries (not cached: a rerun sends it again)."""


def request_failed_rows(dataset, column: str) -> list[int]:
    """Positions of the rows of a scored `dataset` whose status `column` names a request that
    failed after its retries (`RequestFailed`, never cached): the rows a rerun through
    `scoring.ifd.map_scores` scores again, where the datasets cache would replay them."""
    if column not in dataset.column_names:
        return []
    return [i for i, status in enumerate(dataset[column]) if status and f":{RequestFailed.__name__}: " in status]


def guard(parse, answer):
    """`parse()`, or the exception standing for the answer (a failed request, a problem)."""
    if isinstance(answer, Exception):
        return answer
    try:
        return parse()
    except NoPromptLogprobs as err:
        raise StudentServerError(f"The student server gives no prompt log-probabilities: {err}. Serve the "
                                 "student with vLLM or llama-cpp-python's server, or set student_backend to "
                                 "match it.") from None
    except ServedProblem as err:
        return err
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        return RequestFailed(f"malformed response: {type(err).__name__}: {err}")


def vllm_prompt_body(model: str, ids: Sequence[int]) -> dict:
    """The vLLM request for the prompt log-probabilities of `ids`."""
    return {"model": model, "prompt": [int(i) for i in ids], "max_tokens": 1, "temperature": 0.0,
            "prompt_logprobs": 1}


def echo_body(model: str, text: str, logprobs: int = 1) -> dict:
    """The OpenAI-legacy request for the echoed log-probabilities of `text` (and the top
    `logprobs` candidates at each position)."""
    return {"model": model, "prompt": text, "max_tokens": 1, "temperature": 0.0, "echo": True,
            "logprobs": int(logprobs)}


def top_body(model: str, prompt, k: int, token_ids: bool) -> dict:
    """The request for the top-`k` next-token log-probabilities after `prompt` (ids or text)."""
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0, "logprobs": int(k)}
    if token_ids:
        body["return_tokens_as_token_ids"] = True
    return body


def first_choice(data: Any) -> dict:
    """`data["choices"][0]` of a completions answer; ValueError when there is none."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError("malformed response: no choices")
    return choices[0]


def _value(entry: Any) -> Optional[float]:
    if isinstance(entry, dict):
        entry = entry.get("logprob")
    return float(entry) if isinstance(entry, (int, float)) and not isinstance(entry, bool) else None


def vllm_prompt_logprobs(choice: dict, ids: Sequence[int], start: int) -> list[float]:
    """Log-probabilities of `ids[start:]` from vLLM's `prompt_logprobs` (keys are token ids)."""
    entries = choice.get("prompt_logprobs")
    if not isinstance(entries, list):
        raise NoPromptLogprobs("the answer has no prompt_logprobs (is the server vLLM?)")
    if len(entries) != len(ids):
        raise ServedProblem("misaligned", f"prompt_logprobs has {len(entries)} entries for {len(ids)} tokens")
    out = []
    for i in range(start, len(ids)):
        entry = entries[i]
        value = _value(entry.get(str(ids[i]), entry.get(ids[i]))) if isinstance(entry, dict) else None
        if value is None:
            raise ServedProblem("missing_logprob", f"no log-probability for token {ids[i]} at position {i}")
        out.append(value)
    return out


def align_echo(choice: dict, ends: Sequence[int], start: int, text_length: int) -> tuple:
    """`(logprobs, index)`: the answer's `logprobs` and, for each local token `start..`, the
    index of the server's token over the same characters (ServedProblem `misaligned` when the
    server split them differently).

    `ends[j]` is the character end of local token j in the text sent, which was `text_length`
    characters long. Server token i covers `[text_offset[i], text_offset[i+1])`; tokens from
    `text_length` on are generated, not the prompt's.
    """
    lp = choice.get("logprobs")
    if not isinstance(lp, dict) or not isinstance(lp.get("token_logprobs"), list):
        raise NoPromptLogprobs("the answer has no logprobs (does the server support echo with logprobs?)")
    tokens, offsets = lp.get("tokens") or [], lp.get("text_offset") or []
    if not (len(tokens) == len(offsets) == len(lp["token_logprobs"])):
        raise ServedProblem("misaligned", "tokens, text_offset and token_logprobs differ in length")
    server = []  # (start, end, index) of the prompt's tokens
    for i in range(len(tokens)):
        s = int(offsets[i])
        if s >= text_length:
            break  # the generated token
        e = int(offsets[i + 1]) if i + 1 < len(offsets) else s + len(tokens[i] or "")
        server.append((s, min(e, text_length), i))
    if start >= len(ends):
        return lp, []
    begin, end = (ends[start - 1] if start > 0 else 0), ends[-1]
    if not server and text_length > 0:  # e.g. llama.cpp's llama-server: the generated token only
        raise NoPromptLogprobs("the answer has no log-probabilities for the prompt's tokens")
    inside = [(s, e, i) for s, e, i in server if s >= begin and e <= end and s < end]
    if [e for _, e, _ in inside] != list(ends[start:]):
        raise ServedProblem("misaligned", f"the server's tokens over characters {begin}..{end} differ from the "
                                          "local tokenizer's")
    return lp, [i for _, _, i in inside]


def echo_logprobs(choice: dict, ends: Sequence[int], start: int, text_length: int) -> list[float]:
    """Log-probabilities of the local tokens `start..` from an echoed legacy answer, each the
    server's `token_logprobs` of its token (see `align_echo` for the arguments)."""
    lp, index = align_echo(choice, ends, start, text_length)
    out = []
    for i in index:
        v = lp["token_logprobs"][i]
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ServedProblem("missing_logprob", f"no log-probability for the server's token {i} "
                                                   f"({lp['tokens'][i]!r})")
        out.append(float(v))
    return out


class RatingsOutsideTopK(ServedProblem):
    def __init__(self, detail: str):
        super().__init__("rating_outside_top_k", detail)


def rating_probabilities(choice: dict, keys: Sequence[Sequence[str]]) -> list[float]:
    """Probabilities of each rating from the generated token's `top_logprobs[0]`: `keys[r]` are
    the keys of rating r's tokens (`"token_id:<id>"` or their decoded texts); every one of them
    must be in the returned top-k (else `RatingsOutsideTopK`)."""
    lp = choice.get("logprobs")
    tops = lp.get("top_logprobs") if isinstance(lp, dict) else None
    if not isinstance(tops, list) or not tops or not isinstance(tops[0], dict):
        raise NoPromptLogprobs("the answer has no top_logprobs for the next token")
    top = tops[0]
    out, missing = [], []
    for r, names in enumerate(keys):
        found = [top[name] for name in names if isinstance(top.get(name), (int, float))]
        if len(found) < len(set(names)):
            missing.append(str(r + 1))
        out.append(sum(math.exp(v) for v in found))
    if missing:
        raise RatingsOutsideTopK(f"rating(s) {missing} not among the {len(top)} returned top log-probabilities "
                                 "(raise top_logprobs, and vLLM's --max-logprobs with it)")
    return out
