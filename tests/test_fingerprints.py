"""What datasets hashes for each stage (`datasets.fingerprint.Hasher`, the fingerprint of a `map`):
it changes exactly when the output can change (package version, weights, configuration) and
not otherwise (runtime knobs, a loaded model)."""

from __future__ import annotations

import doctest
import pickle
import shutil

import pytest
from datasets.fingerprint import Hasher

import reflectune_hf
from reflectune_hf import utils
from reflectune_hf.evaluation.stages import PairwiseJudge
from reflectune_hf.reflection.extract import extract_instruction_reflection, extract_response_reflection
from reflectune_hf.publishing.hub import _messages_or_null
from reflectune_hf.models import model_identity, resolve_model
from reflectune_hf.oracles import TransformersOracle
from reflectune_hf.reflection.stages import CompressInstruction, ReflectInstruction, ReflectResponse
from reflectune_hf.scoring.ifd import IFDScorer
from reflectune_hf.selection.select import ifd_below, is_scored
from reflectune_hf.scoring.selectit import SelectITScorer
from reflectune_hf.training.sft import to_messages
from reflectune_hf.tuna.stages import ContextualRank, SampleResponses, rank_by_logprob
from reflectune_hf.reflection.variants import _finish_split

from scripted_oracle import ScriptedOracle

MAP_FUNCTIONS = [extract_instruction_reflection, extract_response_reflection, rank_by_logprob, to_messages,
                 _finish_split, _messages_or_null]


def stages():
    oracle = ScriptedOracle()
    return [CompressInstruction(oracle), ReflectInstruction(oracle), ReflectResponse(oracle),
            SampleResponses(oracle), ContextualRank(oracle), PairwiseJudge(oracle), ifd_below(1.0), is_scored(),
            IFDScorer(), SelectITScorer(k=2), TransformersOracle(cache=False)]


@pytest.fixture
def new_version(monkeypatch):
    """Pretend the package was upgraded."""
    def upgrade():
        monkeypatch.setattr(reflectune_hf, "__version__", reflectune_hf.__version__ + ".post1")
    return upgrade


def test_module_level_map_functions_are_hashed_with_the_package_version(new_version):
    before = [Hasher.hash(f) for f in MAP_FUNCTIONS]
    assert before == [Hasher.hash(f) for f in MAP_FUNCTIONS], "stable within a version"
    assert len(set(before)) == len(before), "each function its own fingerprint"
    new_version()
    after = [Hasher.hash(f) for f in MAP_FUNCTIONS]
    assert all(a != b for a, b in zip(before, after)), "an upgrade computes the rows again"


def test_versioned_functions_keep_name_doc_signature_and_pickle_to_themselves():
    import inspect

    for f in MAP_FUNCTIONS:
        assert isinstance(f, utils.VersionedFunction) and callable(f)
        assert f.__name__ == f.__wrapped__.__name__ and f.__doc__ == f.__wrapped__.__doc__
        assert inspect.signature(f) == inspect.signature(f.__wrapped__)
        assert pickle.loads(pickle.dumps(f)) is f
    assert to_messages({"instruction": "Hi.", "output": "Hello."})["messages"][1]["content"] == "Hello."
    from reflectune_hf.reflection import extract

    finder = doctest.DocTestFinder()
    names = {t.name.rsplit(".", 1)[-1] for t in finder.find(extract) if t.examples}
    assert {"extract_instruction_reflection", "extract_response_reflection"} <= names, "doctests still collected"
    assert doctest.testmod(extract).failed == 0 and doctest.testmod(utils).failed == 0


def test_stages_are_hashed_with_the_package_version(new_version):
    before = [Hasher.hash(s) for s in stages()]
    assert before == [Hasher.hash(s) for s in stages()], "stable within a version"
    new_version()
    after = [Hasher.hash(s) for s in stages()]
    changed = [a != b for a, b in zip(before, after)]
    assert all(changed), [type(s).__name__ for s, c in zip(stages(), changed) if not c]
    # the version only identifies: unpickled, a stage has no trace of it
    assert utils.IDENTITY_KEY not in vars(pickle.loads(pickle.dumps(IFDScorer())))


def test_ifd_scorer_runtime_knobs_do_not_change_the_hash_config_does():
    base = Hasher.hash(IFDScorer())
    for knobs in ({"device": "cpu"}, {"num_threads": 3}, {"max_tokens_per_batch": 333},
                  {"device": "cuda:1", "num_threads": 1, "max_tokens_per_batch": 4096}):
        assert Hasher.hash(IFDScorer(**knobs)) == base, knobs
    for config in ({"template": "alpaca"}, {"max_length": 1024}, {"dtype": "bfloat16"}, {"model": "other/model"}):
        assert Hasher.hash(IFDScorer(**config)) != base, config
    copy = pickle.loads(pickle.dumps(IFDScorer(device="cpu", max_tokens_per_batch=77, template="alpaca")))
    assert (copy.template, copy.device, copy.max_tokens_per_batch) == ("alpaca", None, None)  # workers pick their own


def test_selectit_runtime_knobs_do_not_change_the_hash_config_does():
    base = Hasher.hash(SelectITScorer(k=2))
    assert Hasher.hash(SelectITScorer(k=2, device="cpu", batch_size=3)) == base
    for config in ({"k": 3}, {"alpha": 0.5}, {"dtype": "bfloat16"}, {"max_length": 64}):
        assert Hasher.hash(SelectITScorer(**{"k": 2, **config})) != base, config
    assert pickle.loads(pickle.dumps(SelectITScorer(k=2, batch_size=3))).batch_size == 16


def test_oracle_speed_knobs_do_not_change_a_stage_hash_its_configuration_does():
    """Another `max_concurrency`, `timeout`, `progress` or batch size changed every stage's
    fingerprint, so a rerun recomputed the whole chain (IFD scoring included) from the oracle cache."""
    from reflectune_hf.oracles import LlamaCppOracle, OpenAIBatchOracle, OpenAIOracle

    url = "http://127.0.0.1:9/v1"
    cases = [
        (lambda **k: OpenAIOracle("m", base_url=url, **k),
         [{"max_concurrency": 4}, {"timeout": 30.0}, {"max_retries": 0}, {"progress": False}],
         [{"requests_per_minute": 60}, {"context_window": 4096}, {"structured": "off"}]),
        (lambda **k: OpenAIBatchOracle("m", base_url=url, **k), [{"poll_interval": 1.0}, {"timeout": 5.0}],
         [{"completion_window": "1h"}]),
        (lambda **k: TransformersOracle(cache=False, **k), [{"batch_size": 2}, {"device": "cpu"}, {"progress": True}],
         [{"dtype": "bfloat16"}, {"max_new_tokens": 7}]),
        (lambda **k: LlamaCppOracle(cache=False, **k), [{"batch_size": 4}, {"progress": True}, {"n_threads": 1}],
         [{"max_new_tokens": 7}, {"weights": "gguf"}]),
    ]
    for make, knobs, configs in cases:
        base = Hasher.hash(ReflectResponse(make()))
        for knob in knobs:
            assert Hasher.hash(ReflectResponse(make(**knob))) == base, knob
        for config in configs:
            assert Hasher.hash(ReflectResponse(make(**config))) != base, config
    worker = pickle.loads(pickle.dumps(OpenAIOracle("m", base_url=url, max_concurrency=4, requests_per_minute=60)))
    assert (worker.max_concurrency, worker.timeout, worker.requests_per_minute) == (32, 120.0, 60)


def test_oracle_fingerprint_follows_its_weights(tmp_path):
    """`local:./my-oracle` retrained in place: new weights, new fingerprint (and oracle cache key)."""
    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "my-oracle"
    shutil.copytree(resolve_model("smollm2-135m-instruct"), model_dir)
    oracle = TransformersOracle(str(model_dir), cache=False)
    stage = ReflectInstruction(oracle)
    before, key_before = Hasher.hash(stage), oracle._identity()
    assert Hasher.hash(ReflectInstruction(TransformersOracle(str(model_dir), cache=False))) == before
    weights = model_dir / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1.0  # "training"
    save_file(tensors, str(weights), metadata={"format": "pt"})
    retrained = TransformersOracle(str(model_dir), cache=False)
    assert Hasher.hash(ReflectInstruction(retrained)) != before
    assert retrained._identity() != key_before


def test_hub_model_identity_has_its_cached_revision(tmp_path, monkeypatch):
    """A Hub id is identified with the commit of its local snapshot (offline, from the HF cache)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--me--oracle"

    def snapshot(commit: str) -> None:
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    snapshot("a" * 40)
    assert model_identity("me/oracle")["revision"] == "a" * 40
    first = Hasher.hash(TransformersOracle("me/oracle", cache=False))
    key = TransformersOracle("me/oracle", cache=False)._identity()[0]
    assert key.startswith("transformers:me/oracle@") and key.endswith(":float32")
    snapshot("b" * 40)
    assert Hasher.hash(TransformersOracle("me/oracle", cache=False)) != first
    assert TransformersOracle("me/oracle", cache=False)._identity()[0] != key  # the cache key follows the commit


def test_llamacpp_decoding_revision_changes_the_fingerprint_as_the_cache_key(monkeypatch):
    """A new `DECODING_REVISION` (the stop set changed) re-asked the oracle cache but not datasets':
    the stage maps decoded the old way were replayed from the datasets cache."""
    from reflectune_hf.oracles import LlamaCppOracle, llamacpp_local

    before = Hasher.hash(ReflectResponse(LlamaCppOracle(cache=False)))
    monkeypatch.setattr(llamacpp_local, "DECODING_REVISION", llamacpp_local.DECODING_REVISION + 1)
    assert Hasher.hash(ReflectResponse(LlamaCppOracle(cache=False))) != before


def test_whole_number_sampling_parameters_are_the_same_request_and_stage_as_floats():
    """`temperature=0` (Python) and 0.0 (the CLI) gave other oracle cache keys and stage fingerprints:
    every identical request was sent, and paid for, again."""
    from reflectune_hf.oracles import ChatRequest

    messages = [{"role": "user", "content": "Hi"}]
    assert ChatRequest(messages, temperature=0, top_p=1).key("m") == ChatRequest(messages, temperature=0.0).key("m")
    oracle = ScriptedOracle()
    for make in (ReflectResponse, SampleResponses, ContextualRank):
        assert Hasher.hash(make(oracle, temperature=1, top_p=1)) == Hasher.hash(make(oracle, temperature=1.0)), make
    assert Hasher.hash(ReflectResponse(oracle, retry_temperature=1)) == Hasher.hash(
        ReflectResponse(oracle, retry_temperature=1.0))
