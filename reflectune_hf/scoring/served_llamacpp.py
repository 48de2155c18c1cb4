"""llama-cpp-python's echoed log-probabilities read around its off-by-one (pure functions and
the request plan; `scoring.served.StudentServer` sends the requests).

llama-cpp-python's server (0.3.x) pairs echoed log-probabilities one position off when the
prompt does not start with the BOS token (SmolLM2, Qwen: tokenizers that add none): for the
prompt tokens t0..tn, entry i of `token_logprobs` is the probability of t_i under the
distribution that predicts t_{i+1} (abetlen/llama-cpp-python#1983), and the echo carries no
generated token. Its `top_logprobs[i]` is the top-k of that same distribution, so

    log p(t_{i+1} | t_0..t_i) = top_logprobs[i][text of t_{i+1}]     (i >= 1)

when t_{i+1} is among the top `ECHO_TOP_K` and its text names it alone. The echo is sent with
`logprobs=ECHO_TOP_K`; every scored token it cannot give is asked once more with a forced
token (`bias_body`: the text before it as the prompt, `logit_bias` +100 on its id, one token;
llama-cpp-python reports the unbiased log-probability of the token it returns). That request
is needed for:

- the second token of a text (the server nulls `top_logprobs[0]`);
- a token outside the top `ECHO_TOP_K` (measured on issue #20's 16 parity rows with SmolLM2:
  21% of scored tokens at k=100, 36% at k=20, 11% at k=1000; a text's first words are often
  improbable out of context. A forced request costs the server about one echoed position (the
  Python sort of the vocabulary dominates both); k=1000 halves the forced requests but its
  answers grow to ~26 KB per token, so k=100 (~2.6 KB): README, "A student served by vLLM or
  llama.cpp");
- a token whose text another vocabulary entry shares (the server keys `top_logprobs` by text:
  byte fragments of a UTF-8 character render as "", several entries as " "), or whose text is
  that of the token before it (the server overwrites that key with a value of its own).

A forced answer whose returned token or prompt token count differs from the local tokens (the
server tokenised the text before the token differently) makes the span `misaligned`; an echo
whose token count differs from the server's prompt token count (a BOS token inside the text,
which the server leaves out of the echo) too. Each value is thus exactly the server's
probability of our token after our context, or the row gets a status.

`probe_bodies` / `probe_is_shifted` tell whether a server has the off-by-one (a fixed version is
read the normal way): the echo of a short text against the forced probability of its last token.

Example:
    >>> from reflectune_hf.scoring.served_llamacpp import compact_echo
    >>> answer = {"choices": [{"logprobs": {"tokens": ["a", " b"], "text_offset": [0, 1],
    ...     "token_logprobs": [None, -3.0], "top_logprobs": [None, {" b": -0.5, " c": -1.0}]}}]}
    >>> compact_echo(answer)["choices"][0]["logprobs"]["top_logprobs"]
    [None, {}]
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from typing import Callable, Optional, Sequence

from .served_parse import (ServedProblem, StudentServerError, align_echo, echo_body, echo_logprobs,
                           first_choice, guard)

ECHO_TOP_K = 100  # top log-probabilities per echoed position (see the module docstring for the choice)
FORCE_BIAS = 100.0  # logit bias that makes the forced token the greedy choice
PROBE_TEXT = "The cat sat on the mat."
PROBE_TOKEN = 3  # the probe reads the probability of this token of PROBE_TEXT (" on")
PROBE_TOLERANCE = 0.05  # nats: the same server and weights on both sides


def bias_body(model: str, prompt: str, token_id: int) -> dict:
    """The request for the log-probability of `token_id` right after `prompt`."""
    return {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0, "logprobs": 1,
            "logit_bias": {str(int(token_id)): FORCE_BIAS}}


def compact_echo(answer: dict) -> dict:
    """The echo answer with each position's top log-probabilities cut to the one the shifted
    reading uses (the next prompt token's), so that the cache stores k=1-sized answers."""
    out = copy.deepcopy(answer)
    lp = first_choice(out).get("logprobs")
    if not isinstance(lp, dict) or not isinstance(lp.get("top_logprobs"), list):
        return out
    tokens, tops = lp.get("tokens") or [], lp["top_logprobs"]
    for i, top in enumerate(tops):
        if isinstance(top, dict):
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            tops[i] = {nxt: top[nxt]} if nxt is not None and nxt in top else {}
    return out


def shared_texts(tokenizer) -> frozenset:
    """Texts that name more than one vocabulary entry as llama-cpp-python renders them (bytes
    decoded with errors="ignore", special tokens as ""), and the texts of byte fragments."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True,
                                   clean_up_tokenization_spaces=False)
    counts = Counter(t.replace("\ufffd", "") for t in texts)
    return frozenset([""] + [t for t, n in counts.items() if n > 1]
                     + [t.replace("\ufffd", "") for t in texts if "\ufffd" in t])


def _prompt_tokens(answer: dict) -> Optional[int]:
    usage = answer.get("usage") if isinstance(answer, dict) else None
    value = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return value if isinstance(value, int) else None


def shifted_reading(answer: dict, ids: Sequence[int], ends: Sequence[int], start: int, text: str,
                    shared: frozenset) -> tuple:
    """`(values, forced)` for the local tokens `start..` of one echo answer: `values[j]` is the
    log-probability read from the top log-probabilities, or None where a forced request must
    give it; `forced` lists those as `(j, prompt text, token id, token text, prompt tokens)`.
    An answer that holds a generated token paired its prompt normally (it began with BOS):
    its `token_logprobs` are read as they are."""
    choice = first_choice(answer)
    lp, index = align_echo(choice, ends, start, len(text))
    tokens, offsets, tops = lp["tokens"], lp["text_offset"], lp.get("top_logprobs") or []
    if offsets and int(offsets[-1]) >= len(text):  # a generated token: paired normally
        return echo_logprobs(choice, ends, start, len(text)), []
    if _prompt_tokens(answer) != len(tokens):
        raise ServedProblem("misaligned", f"the echo holds {len(tokens)} tokens of the server's "
                                          f"{_prompt_tokens(answer)} (a BOS token inside the text?)")
    values: list = []
    forced = []
    for j, i in enumerate(index):
        if i == 0:
            raise ServedProblem("misaligned", "a scored token is the server's first token")
        name = tokens[i]
        top = tops[i - 1] if i - 1 < len(tops) else None
        value = top.get(name) if isinstance(top, dict) and name not in shared and name != tokens[i - 1] else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            values.append(float(value))
        else:
            values.append(None)
            forced.append((j, text[:int(offsets[i])], int(ids[start + j]), name, i))
    return values, forced


def forced_value(answer: dict, name: str, n_prompt: int) -> float:
    """The log-probability of the forced token from its answer; ServedProblem `misaligned` when
    the server returned another token or tokenised the prompt into another count."""
    lp = first_choice(answer).get("logprobs")
    tokens = lp.get("tokens") if isinstance(lp, dict) else None
    values = lp.get("token_logprobs") if isinstance(lp, dict) else None
    if not tokens or not values or tokens[0] != name or _prompt_tokens(answer) != n_prompt:
        got = tokens[0] if tokens else None
        raise ServedProblem("misaligned", f"forcing {name!r} after {n_prompt} tokens returned {got!r} after "
                                          f"{_prompt_tokens(answer)} (the server tokenised the text before it "
                                          "differently)")
    value = values[0]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ServedProblem("missing_logprob", f"no log-probability for the forced token {name!r}")
    return float(value)


def shifted_span_logprobs(fetch: Callable, model: str, spans: Sequence, plans: Sequence, shared: frozenset) -> list:
    """Per span (`plans[i]`: `(text, ends)` or the exception standing for it): the
    log-probabilities of its scored tokens, or the exception (see the module docstring).
    `fetch(bodies, compact=None)` answers requests in order (`StudentServer.fetch`)."""
    todo = [i for i, p in enumerate(plans) if not isinstance(p, Exception)]
    answers = dict(zip(todo, fetch([echo_body(model, plans[i][0], ECHO_TOP_K) for i in todo], compact=compact_echo)))
    out: list = list(plans)
    pending = {}  # span index -> (values, forced)
    for i in todo:
        text, ends = plans[i]
        read = guard(lambda a=answers[i], s=spans[i], t=text, e=ends: shifted_reading(a, s.ids, e, s.start, t, shared),
                     answers[i])
        if isinstance(read, Exception):
            out[i] = read
        elif read[1]:
            pending[i] = read
        else:
            out[i] = read[0]
    wanted = [(i, f) for i, (_, forced) in pending.items() for f in forced]
    replies = fetch([bias_body(model, f[1], f[2]) for _, f in wanted])
    for (i, (j, _, _, name, n_prompt)), reply in zip(wanted, replies):
        values = pending[i][0]
        if isinstance(values, Exception):
            continue
        value = guard(lambda r=reply, nm=name, n=n_prompt: forced_value(r, nm, n), reply)
        if isinstance(value, Exception):
            pending[i] = (value, None)
        else:
            values[j] = value
    for i, (values, _) in pending.items():
        out[i] = values
    return out


def probe_bodies(model: str, tokenizer) -> list:
    """The probe's two requests: the echo of PROBE_TEXT up to its PROBE_TOKEN-th token, and that
    token forced after the text before it."""
    encoded = tokenizer(PROBE_TEXT, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    return [echo_body(model, PROBE_TEXT[:offsets[PROBE_TOKEN][1]], ECHO_TOP_K),
            bias_body(model, PROBE_TEXT[:offsets[PROBE_TOKEN - 1][1]], ids[PROBE_TOKEN])]


def probe_is_shifted(bodies: Sequence[dict], answers: Sequence) -> bool:
    """Whether the server pairs echoed log-probabilities one position off, from the answers to
    `probe_bodies`: the echoed value of the probe token, read normally and shifted, against its
    forced value (StudentServerError when a probe request failed or neither reading matches)."""
    for answer in answers:
        if isinstance(answer, Exception):
            raise StudentServerError(f"The llama.cpp probe request failed: {answer}")
    forced = first_choice(answers[1])["logprobs"]
    name, exact = forced["tokens"][0], forced["token_logprobs"][0]
    lp = first_choice(answers[0])["logprobs"]
    at = [i for i, (t, o) in enumerate(zip(lp["tokens"], lp["text_offset"]))
          if t == name and int(o) == len(bodies[1]["prompt"])]
    if not at or not isinstance(exact, (int, float)):
        raise StudentServerError(f"The llama.cpp probe found no token {name!r} in the echo of {PROBE_TEXT!r}")
    i = at[0]
    normal = lp["token_logprobs"][i]
    shifted = (lp.get("top_logprobs") or [None] * (i + 1))[i - 1] or {}
    if isinstance(normal, (int, float)) and abs(normal - exact) <= PROBE_TOLERANCE:
        return False
    if isinstance(shifted.get(name), (int, float)) and abs(shifted[name] - exact) <= PROBE_TOLERANCE:
        return True
    raise StudentServerError(f"The llama.cpp server's echoed log-probabilities match neither reading (forced "
                             f"{exact:.3f}, echoed {normal}, shifted {shifted.get(name)}); set student_backend='echo' "
                             "to read them as they are")
