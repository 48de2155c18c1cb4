"""The loopback test server itself: as a counting proxy it relays every route to the right place."""

from __future__ import annotations

import json
import urllib.request

from loopback import LoopbackServer


class _RootRoutes(LoopbackServer):
    """An upstream that answers a root route, as llama-cpp-python serves /openapi.json."""

    def extra_get(self, handler) -> None:
        if handler.path == "/openapi.json":
            return handler._send(200, {"info": {"title": "🦙 llama.cpp Python API"}})
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
