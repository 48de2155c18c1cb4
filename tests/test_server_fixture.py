"""The session fixture really serves OpenAI-compatible chat completions on loopback."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.server


def test_server_answers_a_chat_completion(llama_server):
    from openai import OpenAI

    assert llama_server.base_url.startswith("http://127.0.0.1:")
    client = OpenAI(base_url=llama_server.base_url, api_key="not-needed", max_retries=0, timeout=120)
    response = client.chat.completions.create(
        model=llama_server.model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
        temperature=0.0,
        logprobs=True,
        top_logprobs=2,
    )
    choice = response.choices[0]
    assert choice.message.content.strip()
    assert response.usage.prompt_tokens > 0 and response.usage.completion_tokens > 0
    assert choice.logprobs.content and choice.logprobs.content[0].logprob <= 0.0
