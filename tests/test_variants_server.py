"""The reflection stages against the real llama.cpp server with the embedded SmolLM2-135M.

A 135M model rarely follows the answer format: that must show up as statuses, never as errors
or dropped rows. Kept small (8 rows, 32-token completions, no format re-ask in the 8-row run):
each request still costs ~300 prompt tokens, so the 8-row run takes minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import load_from_disk
from datasets.fingerprint import Hasher

from reflectune_hf.reflection.extract import STATUSES
from reflectune_hf.oracles import OpenAIOracle
from loopback import LoopbackServer
from reflectune_hf.reflection.stages import COMPRESS_STATUSES, ReflectResponse
from reflectune_hf.reflection.variants import VARIANT_SPLITS, build_variants

pytestmark = pytest.mark.server

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def _oracle(server_model: str, base_url: str) -> OpenAIOracle:
    # The llama.cpp server answers one request at a time: one in flight, and a timeout that a
    # loaded 2-core machine cannot hit, so every request reaches the server exactly once.
    return OpenAIOracle(server_model, base_url=base_url, max_concurrency=1, timeout=600)


@pytest.mark.slow  # 18 requests of ~300 prompt tokens: minutes on 2 busy cores
def test_build_variants_against_the_server(llama_server, sample):
    ds = sample.select(range(8))  # rows 2 and 4 have an input
    with LoopbackServer(upstream=llama_server.base_url) as proxy:
        oracle = _oracle(llama_server.model, proxy.base_url)
        variants = build_variants(ds, oracle, max_tokens=32, format_retries=0, batch_size=8)
        sent = len(proxy.chat_requests)

    assert tuple(variants) == VARIANT_SPLITS
    for split in VARIANT_SPLITS:
        assert len(variants[split]) == 8 and list(variants[split]["id"]) == list(range(8))
    origin, ri, rr, rb = (variants[s] for s in VARIANT_SPLITS)
    with_input = [i for i, x in enumerate(ds["input"]) if x]
    assert with_input and set(origin["input"]) == {""}
    for i in with_input:  # compression is lossless whatever the model answered
        assert origin[i]["compress_status"] in set(COMPRESS_STATUSES) - {"no_input"}
        assert origin[i]["original_input"] == ds[i]["input"]
        if origin[i]["compress_status"] != "ok":
            assert ds[i]["input"] in origin[i]["instruction"]
    for split, prefixes in (("reflect_instruction", ["instruction"]), ("reflect_response", ["response"]),
                            ("reflect_both", ["instruction", "response"])):
        rows = variants[split]
        assert set(rows["reflection_status"]) <= set(STATUSES)
        for prefix in prefixes:
            statuses = list(rows[f"{prefix}_reflection_status"])
            assert set(statuses) <= set(STATUSES), statuses
            raws, errors = rows[f"{prefix}_reflection_raw"], rows[f"{prefix}_reflection_error"]
            assert all(raw or error for raw, error in zip(raws, errors))  # a text or a recorded error
    for i in range(8):  # a row that was not reflected keeps its pair
        if rr[i]["response_reflection_status"] in ("failed", "oracle_error"):
            assert (rr[i]["instruction"], rr[i]["output"]) == (origin[i]["instruction"], origin[i]["output"])
        if ri[i]["instruction_reflection_status"] in ("failed", "oracle_error"):
            assert (ri[i]["instruction"], ri[i]["output"]) == (origin[i]["instruction"], origin[i]["output"])
    # reflect_both re-asks a pair the instruction reflection left unchanged exactly as
    # reflect_response did: the oracle cache answers, the server sees it once.
    if not any(rows[f"{p}_reflection_error"][i] for rows in (ri, rr, rb) for p in ("instruction", "response")
               for i in range(8)):
        changed = sum((ri[i]["instruction"], ri[i]["output"]) != (origin[i]["instruction"], origin[i]["output"])
                      for i in range(8))
        assert sent == len(with_input) + 8 + 8 + changed


SECOND_RUN = """
import json, sys
from datasets import load_from_disk
from datasets.fingerprint import Hasher
from reflectune_hf.oracles import OpenAIOracle
from reflectune_hf.reflection.stages import ReflectResponse
calls = []
complete = OpenAIOracle.complete
def counting(self, requests):
    calls.append(len(requests))
    return complete(self, requests)
OpenAIOracle.complete = counting
model, base_url, path = sys.argv[1:4]
stage = ReflectResponse(OpenAIOracle(model, base_url=base_url, max_concurrency=1, timeout=600), max_tokens=16)
out = load_from_disk(path).map(stage, batched=True)
print(json.dumps({"calls": calls, "raw": list(out["reflection_raw"]), "hash": Hasher.hash(stage)}))
"""


def test_second_map_in_a_new_process_calls_no_oracle(llama_server, sample, tmp_path):
    sample.select([0, 3]).save_to_disk(tmp_path / "rows")
    ds = load_from_disk(str(tmp_path / "rows"))
    with LoopbackServer(upstream=llama_server.base_url) as proxy:
        stage = ReflectResponse(_oracle(llama_server.model, proxy.base_url), max_tokens=16)
        first = ds.map(stage, batched=True)
        # Every attempt reached the server: a format re-ask is a distinct request, not a cache hit.
        sent = len(proxy.chat_requests)
        assert sent == sum(first["reflection_attempts"]) >= 2 and not any(first["reflection_error"])

        # A new process with an empty oracle cache: only datasets' cache can answer.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]),
               "REFLECTUNE_HF_ORACLE_CACHE": str(tmp_path / "empty-oracle-cache.sqlite")}
        done = subprocess.run([sys.executable, "-c", SECOND_RUN, llama_server.model, proxy.base_url, str(tmp_path / "rows")],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        second = json.loads(done.stdout.strip().splitlines()[-1])
        assert second["calls"] == [] and len(proxy.chat_requests) == sent
        assert second["raw"] == list(first["reflection_raw"]) and second["hash"] == Hasher.hash(stage)
    other = ReflectResponse(_oracle(llama_server.model, llama_server.base_url), max_tokens=16)
    assert Hasher.hash(other) != Hasher.hash(stage)  # another server is another configuration
