"""The one response rule (`scoring.spans`): `prompt + response` tokenised once, scored from
`len(tok(prompt))` (REFERENCE.md §6), on SmolLM2's real byte-level BPE tokenizer."""

from __future__ import annotations


import pytest

from reflectune_hf.models import load_tokenizer
from reflectune_hf.prompts import get_scoring_template
from reflectune_hf.scoring.spans import response_span, response_spans, truncate_ids


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m-instruct")


PROMPT = get_scoring_template("vicuna").format("Smile.", "")


@pytest.mark.parametrize("response", ["Hello there.", "-) ok", ":-) ok", "'s fine", "**bold**", " spaced", "é☃ x"])
def test_the_boundary_is_the_references(tok, response):
    text = PROMPT + response
    span = response_span(tok, PROMPT, response, max_length=2048, group="g")
    assert span.ids == tok(text)["input_ids"] and span.group == "g" and span.text == text
    assert span.start == len(tok.encode(text[: text.rfind(response)])) == len(tok(PROMPT)["input_ids"])


def test_a_merged_boundary_token_is_context(tok):
    span = response_span(tok, PROMPT, "-) ok")
    # "ASSISTANT:" + "-)" is "ANT", ":-", ")": the merged ":-" stands where the prompt's ":" stood.
    assert tok.convert_ids_to_tokens(span.ids[span.start - 2:]) == ["ANT", ":-", ")", "Ġok"]
    assert span.n_scored == 2


def test_truncation_and_nothing_left_to_score(tok):
    prompt_len = len(tok(PROMPT)["input_ids"])
    whole = tok(PROMPT + " one two three")["input_ids"]
    span = response_span(tok, PROMPT, " one two three", max_length=prompt_len + 1)
    assert span.ids == whole[:prompt_len + 1] and span.n_scored == 1
    assert response_span(tok, PROMPT, " one two three", max_length=prompt_len).n_scored == 0
    assert response_span(tok, PROMPT, " one", max_length=prompt_len - 3).n_scored < 0
    assert response_span(tok, PROMPT, "").n_scored == 0
    assert response_span(tok, PROMPT, "-").n_scored == 0  # the whole response merged into the prompt's ":"
    assert truncate_ids(tok, "one two", [7, 8], None) == [7, 8]


def test_eos_is_scored_and_cut_first(tok):
    eos = tok.eos_token_id
    plain = response_span(tok, PROMPT, " Hi.")
    span = response_span(tok, PROMPT, " Hi.", eos=True)
    assert span.ids == plain.ids + [eos] and span.start == plain.start and span.n_scored == plain.n_scored + 1
    full = len(plain.ids)
    assert response_span(tok, PROMPT, " Hi.", max_length=full + 1, eos=True).ids == plain.ids + [eos]
    assert response_span(tok, PROMPT, " Hi.", max_length=full, eos=True).ids == plain.ids  # no room: no EOS
    assert response_span(tok, PROMPT, " Hi.", max_length=full - 1, eos=True).ids == plain.ids[:-1]


def test_batched_spans_equal_one_by_one_and_encoded_texts_are_reused(tok):
    prompts, responses = [PROMPT, PROMPT, "Q:"], [" a", "-) b", ""]
    batched = response_spans(tok, prompts, responses, max_length=64, group=3, eos=True)
    assert batched == [response_span(tok, p, r, 64, group=3, eos=True) for p, r in zip(prompts, responses)]
    encoded = {"P": [5, 6, 7], "PR": [5, 6, 9, 10]}  # texts already tokenised are not tokenised again
    assert response_span(tok, "P", "R", encoded=encoded) == response_span(tok, "P", "R", encoded=dict(encoded))
    assert response_span(tok, "P", "R", encoded=encoded).ids == [5, 6, 9, 10]
    assert response_span(tok, "P", "R", encoded=encoded).start == 3
    fresh: dict = {}
    response_span(tok, "Q:", " x", encoded=fresh)
    assert set(fresh) == {"Q:", "Q: x"}
    assert response_spans(tok, [], []) == []


def test_bad_input_is_named(tok):
    with pytest.raises(TypeError, match="prompt and response must be strings"):
        response_span(tok, PROMPT, None)
    with pytest.raises(TypeError, match="pair 1 is not two strings"):
        response_spans(tok, ["a", "b"], ["c", 3])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        response_spans(tok, ["a", "b"], ["c"])

    class NoEos:
        eos_token_id = None

        def __call__(self, texts, add_special_tokens=True):
            return {"input_ids": [[1] * len(t) for t in texts]}

    with pytest.raises(ValueError, match="has no EOS token"):
        response_span(NoEos(), "a", "b", eos=True)
