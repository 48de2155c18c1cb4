"""ChatRequest: messages kept as given (None, content parts), stable cache keys, clear validation."""

from __future__ import annotations

import pickle
from dataclasses import replace

import pytest

from reflectune_hf.oracles import ChatRequest, OpenAIOracle, estimate
from loopback import LoopbackServer
from reflectune_hf.oracles.runtime import token_guess

USER = [{"role": "user", "content": "Hi"}]
PARTS = [{"type": "text", "text": "What is in this picture?"},
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}}]


def test_plain_string_messages_keep_their_cache_key():
    # Keys computed by the first release: existing oracle caches must stay valid.
    assert ChatRequest(USER, max_tokens=16).key("m", "http://127.0.0.1:8000/v1") == (
        "42393087019fb24dd886caced774abb5afeeb35208a80db517a29dd94aa9283c")
    request = ChatRequest([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x", "name": "bob"}],
                          temperature=0.7, top_p=0.9, max_tokens=64, n=3, logprobs=True, top_logprobs=2, seed=4)
    assert request.key("gpt-4o-mini") == "0c727655a4c7606da3f1d3226774e367e7032cc8ec2a0380d2c6a16d40c1ab91"
    assert dict(request.messages[1]) == {"role": "user", "content": "x", "name": "bob"}


def test_content_is_kept_as_given():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": PARTS},
                {"role": "assistant", "content": None}, {"role": "user", "content": "and now?"}]
    request = ChatRequest(messages, max_tokens=8)
    assert request.message_dicts == messages  # not "None", not a Python repr of the parts
    assert request.to_dict()["messages"] == messages
    assert hash(request) == hash(ChatRequest([dict(m) for m in messages], max_tokens=8))
    assert replace(request, max_tokens=9).message_dicts == messages  # re-freezing is lossless
    assert pickle.loads(pickle.dumps(request)) == request
    # Canonical: key order inside parts does not matter; the parts and their repr are different requests.
    reordered = [{**m, "content": [dict(reversed(list(p.items()))) for p in m["content"]]} if m["role"] == "user"
                 and isinstance(m["content"], list) else m for m in messages]
    assert ChatRequest(reordered, max_tokens=8).key("m") == request.key("m")
    as_repr = [{**m, "content": str(m["content"])} for m in messages]
    assert ChatRequest(as_repr, max_tokens=8).key("m") != request.key("m")


class RecordingServer(LoopbackServer):
    """Keeps the messages of every chat request as they arrived."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bodies: list = []

    def completion(self, body, prompt):
        self.bodies.append(body["messages"])
        return super().completion(body, prompt)


def test_content_parts_go_over_the_wire_as_json():
    messages = [{"role": "user", "content": PARTS}, {"role": "assistant", "content": None},
                {"role": "user", "content": "ok"}]
    with RecordingServer() as server:
        assert OpenAIOracle("echo", base_url=server.base_url).complete([ChatRequest(messages)])[0].ok
    assert server.bodies == [messages]


def test_token_counts_use_the_text_of_content_parts():
    class WordTokenizer:
        def encode(self, text):
            return text.split()

    parts = ChatRequest([{"role": "user", "content": PARTS}], max_tokens=10)
    text = ChatRequest([{"role": "user", "content": "What is in this picture?"}], max_tokens=10)
    assert estimate([parts], tokenizer=WordTokenizer()).prompt_tokens == 3 + 3 + 5
    assert token_guess(parts, 1) == token_guess(text, 1)
    none = ChatRequest([{"role": "assistant", "content": None}, {"role": "user", "content": "go"}])
    assert estimate([none], tokenizer=WordTokenizer()).prompt_tokens == 3 + 3 + 3 + 1  # None counts nothing


@pytest.mark.parametrize("messages, error, match", [
    ("Hi", TypeError, "got a string"),
    ({"role": "user", "content": "Hi"}, TypeError, "got a single dict"),
    (None, TypeError, "got NoneType"),
    ([], ValueError, "messages is empty"),
    (["Hi"], TypeError, r"messages\[0\] is a str"),
    ([{"role": "user"}], ValueError, r"messages\[0\] has no 'content'"),
    ([{"content": "Hi"}], ValueError, r"messages\[0\] has no 'role'"),
    ([{"text": "Hi"}], ValueError, r"has no 'role' or 'content'"),
    ([{"role": "", "content": "Hi"}], ValueError, "role'.* non-empty string"),
    ([{"role": "user", "content": None}], ValueError, r"\(user\) has content None"),
    ([{"role": "user", "content": 3}], TypeError, "string or a list of content parts, got int"),
    ([{"role": "user", "content": ["Hi"]}], TypeError, r"content'\]\[0\] must be a content part dict"),
    ([{"role": "user", "content": [{"type": "text", "text": {1, 2}}]}], TypeError, "set is not JSON-able"),
])
def test_malformed_messages_are_named(messages, error, match):
    with pytest.raises(error, match=match):
        ChatRequest(messages)


@pytest.mark.parametrize("params, error, match", [
    ({"max_tokens": 0}, ValueError, "max_tokens must be >= 1, got 0"),
    ({"max_tokens": -5}, ValueError, "max_tokens must be >= 1"),
    ({"max_tokens": 2.5}, TypeError, "max_tokens must be an integer"),
    ({"max_tokens": True}, TypeError, "max_tokens must be an integer"),
    ({"n": 0}, ValueError, "n must be >= 1, got 0"),
    ({"n": "2"}, TypeError, "n must be an integer"),
    ({"temperature": "0.7"}, TypeError, "temperature must be a number, got str"),
    ({"temperature": None}, TypeError, "temperature must be a number"),
    ({"temperature": float("nan")}, TypeError, "temperature must be a number"),
    ({"temperature": -0.1}, ValueError, "temperature must be >= 0"),
    ({"temperature": float("inf")}, ValueError, "temperature must be >= 0 and finite"),
    ({"top_p": 0}, ValueError, r"top_p must be in \(0, 1\], got 0"),
    ({"top_p": 1.01}, ValueError, r"top_p must be in \(0, 1\]"),
    ({"top_p": "1"}, TypeError, "top_p must be a number"),
    ({"top_logprobs": -1}, ValueError, "top_logprobs must be >= 0"),
    ({"seed": "7"}, TypeError, "seed must be an integer"),
])
def test_bad_sampling_parameters_are_named(params, error, match):
    with pytest.raises(error, match=match):
        ChatRequest(USER, **params)


def test_valid_edge_values_are_accepted():
    import numpy as np

    for params in [{"temperature": 0}, {"temperature": 2.0}, {"top_p": 1}, {"top_p": 1e-6}, {"max_tokens": 1},
                   {"n": np.int64(2)}, {"temperature": np.float32(0.5)}, {"top_logprobs": 0}, {"seed": -1}]:
        ChatRequest(USER, **params)
    ChatRequest([{"role": "tool", "content": "42", "tool_call_id": "call_1"}])  # roles are the server's business
