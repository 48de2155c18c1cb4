"""The loopback test server itself: as a counting proxy it relays every route to the right place."""

from __future__ import annotations

import json
import urllib.request

from loopback import LoopbackServer


class _RootRoutes(LoopbackServer):
    """An upstream that answers a root route, as llama-cpp-python serves /openapi.json."""

    def extra_get(self, handler) -> None:
        if handler.path == "/openapi.json":
            return handler.send_json(200, {"info": {"title": "🦙 llama.cpp Python API"}})
        super().extra_get(handler)


def _get(url: str) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, json.loads(response.read())


def test_proxy_relays_v1_routes_to_the_base_url_and_root_routes_to_the_root():
    with _RootRoutes(model="upstream-model") as upstream, LoopbackServer(upstream=upstream.base_url) as proxy:
        root = proxy.base_url[: -len("/v1")]
        assert _get(proxy.base_url + "/models")[1]["data"][0]["id"] == "upstream-model"
        status, body = _get(root + "/openapi.json")  # was sent to <upstream>/v1/openapi.json: 404
        assert status == 200 and "llama.cpp" in body["info"]["title"]
        assert [entry["path"] for entry in upstream.log] == ["/v1/models", "/openapi.json"]


class _Counting(LoopbackServer):
    """An upstream whose answer to one request changes from one ask to the next (as a server
    whose greedy near-ties round differently with the prompt cache)."""

    def completion(self, body: dict, prompt: str) -> dict:
        answer = super().completion(body, prompt)
        answer["choices"][0]["message"]["content"] = f"answer {len(self.chat_requests)}"
        return answer


def _chat(base_url: str, content: str) -> str:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": content}]}).encode()
    request = urllib.request.Request(base_url + "/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


def test_a_replaying_proxy_answers_a_request_asked_again_with_the_first_answer():
    with _Counting() as upstream, LoopbackServer(upstream=upstream.base_url, replay=True) as proxy:
        first = [_chat(proxy.base_url, "Q1"), _chat(proxy.base_url, "Q2")]
        assert [_chat(proxy.base_url, "Q1"), _chat(proxy.base_url, "Q2")] == first == ["answer 1", "answer 2"]
        assert len(proxy.chat_requests) == 4 and len(upstream.chat_requests) == 2  # counted, not forwarded
    with _Counting() as upstream, LoopbackServer(upstream=upstream.base_url) as proxy:
        assert [_chat(proxy.base_url, "Q1"), _chat(proxy.base_url, "Q1")] == ["answer 1", "answer 2"]
