"""A student served by vLLM or llama.cpp (`scoring.served`): request bodies, parsing, cache and
resume, retries, fingerprints, SelectIT, the CLI flags, and parity with the local engine on the
real llama.cpp server."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reflectune_hf.prompts import get_scoring_template, reverse_prompt
from reflectune_hf.scoring.ifd import LOSS_NAMES, IFDScorer
from reflectune_hf.scoring.served import StudentServer, StudentServerError
from reflectune_hf.scoring.served_parse import ServedProblem, echo_logprobs

sys.path.insert(0, str(Path(__file__).parent))
from vllm_loopback import RATING_TOP, VllmLoopback, fake_logprob  # noqa: E402

ROWS = {"instruction": ["Name a primary colour.", "Add the numbers."], "input": ["", "2 and 3"],
        "output": ["Blue is a primary colour.", "2 + 3 = 5"]}
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def tokenizer():
    from reflectune_hf.models import load_tokenizer

    return load_tokenizer(MODEL)


def expected_spans(tokenizer, instruction, input, output):
    """The four (ids, start) of one row, built from the public prompt API (as the reference)."""
    template = get_scoring_template("vicuna")
    prompt = template.format(instruction, input)
    reverse = template.no_input.format(instruction=reverse_prompt(output))
    whole_reverse, whole = reverse + instruction + input, prompt + output
    ids = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
    return [(ids(instruction + input), 1), (ids(output), 1),
            (ids(whole_reverse), len(ids(whole_reverse[: whole_reverse.rfind(instruction)]))),
            (ids(whole), len(ids(whole[: whole.rfind(output)])))]


def loopback_loss(ids, start):
    values = [fake_logprob(p, t) for p, t in zip(ids[start - 1:-1], ids[start:])]
    return -math.fsum(values) / len(values)


def test_vllm_requests_are_token_ids_with_prompt_logprobs_and_losses_are_exact(tokenizer):
    with VllmLoopback(model="served-name") as server:
        scorer = IFDScorer(MODEL, base_url=server.base_url, server_model="served-name")
        out = scorer(ROWS)
        bodies = server.completions
    assert out["score_status"] == ["ok", "ok"]
    expected = [expected_spans(tokenizer, *row) for row in zip(ROWS["instruction"], ROWS["input"], ROWS["output"])]
    sent = sorted(tuple(b["prompt"]) for b in bodies)
    assert sent == sorted(tuple(ids) for row in expected for ids, _ in row)
    for body in bodies:
        assert set(body) == {"model", "prompt", "max_tokens", "temperature", "prompt_logprobs"}
        assert (body["model"], body["max_tokens"], body["prompt_logprobs"], body["temperature"]) == \
            ("served-name", 1, 1, 0.0)
        assert all(isinstance(i, int) for i in body["prompt"])
    for r, row in enumerate(expected):
        for name, (ids, start) in zip(LOSS_NAMES, row):
            assert out[f"loss_{name}"][r] == pytest.approx(loopback_loss(ids, start), rel=1e-12)
        assert out["ifd"][r] == pytest.approx(math.exp(out["loss_out_condition"][r] - out["loss_out_alone"][r]))


def test_clamped_log_probabilities_give_a_ratio_not_an_ok_nan(monkeypatch, tmp_path):
    """vLLM clamps impossible tokens to -9999: every mean loss is 9999, every perplexity overflows a
    float, and IFD = inf / inf was NaN in a row that said `ok`; exp(9999 - 9999) is 1."""
    import vllm_loopback

    monkeypatch.setattr(vllm_loopback, "fake_logprob", lambda previous, token: -9999.0)
    with VllmLoopback() as server:
        out = IFDScorer(MODEL, base_url=server.base_url, server_model="student", cache=str(tmp_path / "c"))(ROWS)
    assert out["loss_out_alone"] == [9999.0, 9999.0] and math.isinf(out["ppl_out_alone"][0])
    assert out["score_status"] == ["ok", "ok"] and out["ifd"] == [1.0, 1.0] and out["rifd"] == [1.0, 1.0]


def test_failed_requests_are_statuses_and_a_rerun_sends_only_them_then_nothing():
    with VllmLoopback(fail_after=3) as server:
        scorer = IFDScorer(MODEL, base_url=server.base_url, server_model="student", max_retries=0)
        first = scorer(ROWS)
        assert server.answered == 3 and len(server.bodies) == 8
        assert any(s.startswith("error:") or ";error:" in s for s in first["score_status"])
        assert all(math.isnan(v) for s, v in zip(first["score_status"], first["ifd"]) if "out_" in s)
        server.fail_after = None
        second = IFDScorer(MODEL, base_url=server.base_url, server_model="student")(ROWS)
        assert len(server.bodies) == 8 + 5 and second["score_status"] == ["ok", "ok"]
        again = IFDScorer(MODEL, base_url=server.base_url, server_model="student")
        third = again(ROWS)
        assert len(server.bodies) == 13, "a rerun sends nothing"
        assert again.server.usage == {"sent": 0, "cached": 8, "failed": 0}
    assert third == second


def test_map_scores_rerun_scores_again_the_rows_whose_request_failed(tmp_path):
    """The datasets cache replayed the `error:RequestFailed` rows of a served scoring forever
    (nothing was sent again); a rerun now sends the failed requests and the rows are `ok`."""
    from datasets import Dataset, load_from_disk

    from reflectune_hf.scoring.ifd import map_scores

    Dataset.from_dict(ROWS).save_to_disk(tmp_path / "ds")
    with VllmLoopback(fail_after=3) as server:
        run = lambda: map_scores(load_from_disk(str(tmp_path / "ds")), IFDScorer(  # noqa: E731
            MODEL, base_url=server.base_url, server_model="student", max_retries=0, cache=str(tmp_path / "c")))
        assert all(":RequestFailed: " in s for s in run()["score_status"])
        server.fail_after = None
        assert list(run()["score_status"]) == ["ok", "ok"] and len(server.bodies) == 8 + 5
        assert list(run()["score_status"]) == ["ok", "ok"] and len(server.bodies) == 13  # replayed, clean


KILLED_RUN = """
import sys
from reflectune_hf import load_sample
from reflectune_hf.scoring.ifd import IFDScorer
rows = load_sample().select(range(6)).to_dict()
IFDScorer("smollm2-135m-instruct", base_url=sys.argv[1], server_model="student", max_concurrency=1)(rows)
"""


@pytest.mark.slow  # a child process that loads the package, then a kill
def test_a_killed_run_resumes_from_the_cache(tmp_path):
    import sqlite3

    from reflectune_hf import load_sample

    cache = os.environ["REFLECTUNE_HF_ORACLE_CACHE"]
    rows = load_sample().select(range(6)).to_dict()
    with VllmLoopback(delay=0.3) as server:
        child = subprocess.Popen([sys.executable, "-c", KILLED_RUN, server.base_url], env=dict(os.environ),
                                 cwd=str(Path(__file__).parents[1]))
        done = 0
        deadline = time.monotonic() + 240
        while done < 4 and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.2)
            if Path(cache).exists():
                try:
                    done = sqlite3.connect(cache).execute("SELECT COUNT(*) FROM served_student").fetchone()[0]
                except sqlite3.OperationalError:
                    done = 0
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert 4 <= done < 24, "killed in the middle of the run"
        cached = sqlite3.connect(cache).execute("SELECT COUNT(*) FROM served_student").fetchone()[0]
        # a request of the killed child may still be in the server's hands: let it land before counting
        before, settle = len(server.bodies), time.monotonic() + 5
        while time.monotonic() < settle:
            time.sleep(1.0)
            if len(server.bodies) == before:
                break
            before = len(server.bodies)
        server.delay = 0.0
        resumed = IFDScorer(MODEL, base_url=server.base_url, server_model="student")
        out = resumed(rows)
        assert resumed.server.usage["cached"] == cached and resumed.server.usage["sent"] == 24 - cached
        assert len(server.bodies) - before == 24 - cached
    assert out["score_status"] == ["ok"] * 6


def test_429_with_retry_after_and_500_are_retried():
    with VllmLoopback(faults=["429", "500"]) as server:
        scorer = IFDScorer(MODEL, base_url=server.base_url, server_model="student", max_concurrency=1, max_retries=2)
        out = scorer(ROWS)
        assert len(server.bodies) == 8 + 2
    assert out["score_status"] == ["ok", "ok"]
    assert scorer.server.usage == {"sent": 8, "cached": 0, "failed": 0}


def test_unreachable_server_is_one_clear_error():
    from conftest import free_port

    scorer = IFDScorer(MODEL, base_url=f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(StudentServerError, match="Cannot connect to the student server"):
        scorer(ROWS)


def test_fingerprint_has_server_model_tokenizer_and_url_without_secrets_not_speed():
    base = IFDScorer(MODEL, base_url="http://user:secret@127.0.0.1:8000/v1", server_model="a")
    assert "secret" not in repr(base) and "secret" not in str(base.server.identity())
    assert base.server.base_url == "http://127.0.0.1:8000/v1" and base.server.auth == ("user", "secret")
    same = IFDScorer(MODEL, base_url="http://127.0.0.1:8000/v1", server_model="a", max_concurrency=3, timeout=5,
                     max_retries=1)
    assert same.fingerprint == base.fingerprint
    for other in (IFDScorer(MODEL, base_url="http://127.0.0.1:8000/v1", server_model="b"),
                  IFDScorer(MODEL, base_url="http://127.0.0.1:9000/v1", server_model="a"),
                  IFDScorer(MODEL, base_url="http://127.0.0.1:8000/v1", server_model="a", template="alpaca"),
                  IFDScorer(MODEL)):
        assert other.fingerprint != base.fingerprint
    from datasets.fingerprint import Hasher

    assert Hasher.hash(same) == Hasher.hash(IFDScorer(MODEL, base_url="http://127.0.0.1:8000/v1", server_model="a"))


def test_echo_answers_map_to_local_tokens_by_character_offsets():
    # local tokens "Hi", " there", "!" (ends 2, 8, 9); score the last two
    choice = {"logprobs": {"tokens": ["Hi", " there", "!", "\n"], "text_offset": [0, 2, 8, 9],
                           "token_logprobs": [None, -1.0, -2.0, -0.1], "top_logprobs": [None, {}, {}, {}]}}
    assert echo_logprobs(choice, [2, 8, 9], start=1, text_length=9) == [-1.0, -2.0]
    split = {"logprobs": {"tokens": ["Hi", " the", "re", "!"], "text_offset": [0, 2, 6, 8],
                          "token_logprobs": [None, -1.0, -1.5, -2.0]}}
    with pytest.raises(ServedProblem) as problem:
        echo_logprobs(split, [2, 8, 9], start=1, text_length=9)
    assert problem.value.status == "misaligned"
    # the context may be split differently: only the scored tokens must match
    assert echo_logprobs(split, [2, 8, 9], start=2, text_length=9) == [-2.0]


def test_selectit_reads_the_rating_tokens_from_the_top_logprobs():
    import numpy as np

    from reflectune_hf.scoring.selectit import SelectITScorer
    from reflectune_hf.scoring.selectit_math import sentence_scores, token_scores

    row = {"instruction": ["Name a colour."], "output": ["Blue."]}
    with VllmLoopback() as server:
        out = SelectITScorer(k=2, base_url=server.base_url, server_model="student")(row)
        bodies = server.completions
        narrow = SelectITScorer(k=2, base_url=server.base_url, server_model="student", top_logprobs=5)(row)
    assert len(bodies) == 2
    for body in bodies:
        assert body["logprobs"] == 20 and body["return_tokens_as_token_ids"] is True and body["max_tokens"] == 1
        assert all(isinstance(i, int) for i in body["prompt"])
    probs = np.exp([RATING_TOP[i] for i in (33, 34, 35, 36, 37)])
    token = float(token_scores(probs))
    assert out["selectit_status"] == ["ok"]
    assert out["selectit_token"][0] == pytest.approx(token)
    assert out["selectit_sentence"][0] == pytest.approx(float(sentence_scores([token, token], 0.2)))
    assert narrow["selectit_status"] == [f"rating_outside_top_k:{MODEL}"] and math.isnan(narrow["selectit_token"][0])


def test_selectit_served_takes_one_model():
    from reflectune_hf.scoring.selectit import SelectITScorer

    with pytest.raises(ValueError, match="one model"):
        SelectITScorer(models=[MODEL, MODEL], base_url="http://127.0.0.1:8000/v1")


def test_score_command_flags_reach_the_served_scorer():
    from datasets import Dataset

    from reflectune_hf.cli import jobs as pipeline
    from reflectune_hf.cli.main import parse_config

    with VllmLoopback(model="served") as server:
        config = parse_config("score", ["--data", "sample", "--student_base_url", server.base_url,
                                        "--student_server_model", "served", "--student_backend", "vllm",
                                        "--student_max_concurrency", "4"])
        assert (config.student_base_url, config.student_server_model, config.student_backend) == \
            (server.base_url, "served", "vllm")
        scored = pipeline.score(config, Dataset.from_dict(ROWS))
        assert scored["score_status"] == ["ok", "ok"]
        assert {b["model"] for b in server.completions} == {"served"}
    with pytest.raises(SystemExit):
        parse_config("score", ["--student_backend", "tgi"])


def test_student_server_keys_in_a_yaml_config(tmp_path):
    from reflectune_hf.cli.main import parse_config
    from reflectune_hf.sanitize import sanitize_config

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("student_base_url: http://user:key@127.0.0.1:8000/v1\nstudent_server_model: big-student\n"
                      "student_backend: llama.cpp\n")
    config = parse_config("recycle", ["--config", str(recipe), "--oracle_model", "gpt-4o-mini"])
    assert (config.student_server_model, config.student_backend) == ("big-student", "llamacpp")
    assert sanitize_config(vars(config))["student_base_url"] == "http://127.0.0.1:8000/v1"


# -- the real llama.cpp server ------------------------------------------------------------------


def parity_rows(n: int = 16) -> list[dict]:
    """`n` real Alpaca rows of moderate length (60-140 characters: the llama.cpp server's echo
    path costs seconds per text on 2 cores), from the shared data, else the bundled sample."""
    from conftest import SHARED

    from reflectune_hf.data import read_records, sample_path

    path = SHARED / "data" / "cherry_alpaca_5_percent.json"
    rows = read_records(path if path.is_file() else sample_path())
    picked = [r for r in rows if 60 <= len(r["instruction"]) + len(r.get("input") or "") + len(r["output"]) <= 140]
    return (picked if len(picked) >= n else rows)[:n]


# Measured on these 16 rows (12 ok; 4 have one-token outputs: `no_scored_token:out_alone` on both
# sides) against the plain local engine (fp32; the server computes with Q4_1 weights), with the
# shifted reading of llama-cpp-python's echo (`scoring.served_llamacpp`): largest absolute loss
# differences 0.122, 0.219, 0.083, 0.129, IFD Spearman 1.0, statuses identical (249 requests: 64
# echoes, the 2 probe requests, 183 forced tokens). `scripts/bench_ifd.py --base_url <server>
# --parity --rows 16` prints these figures. The test checks bounds of about twice those maxima on
# the five shortest texts of those rows (four ok, one with a one-token output): ~730 prompt tokens
# instead of ~2800, each costing llama-cpp-python a sort of the 49k vocabulary in Python. Maxima
# and a perfect ranking hold on any subset.
LOCAL_TOLERANCE = {"ins_alone": 0.25, "out_alone": 0.4, "ins_condition": 0.15, "out_condition": 0.25}


def short_parity_rows(tokenizer, scored: int = 4) -> list[dict]:
    """Of `parity_rows()`, the `scored` rows with the fewest tokens whose outputs hold several
    tokens, then the one with the fewest whose output is a single token (if any)."""
    size = lambda r: sum(len(ids) for ids, _ in expected_spans(  # noqa: E731
        tokenizer, r["instruction"], r.get("input") or "", r["output"]))
    single = lambda r: len(tokenizer(r["output"])["input_ids"]) == 1  # noqa: E731
    rows = parity_rows()
    return (sorted((r for r in rows if not single(r)), key=size)[:scored]
            + sorted((r for r in rows if single(r)), key=size)[:1])


@pytest.mark.server
@pytest.mark.slow  # llama-cpp-python's echo path sorts the vocabulary per prompt token
def test_llamacpp_server_agrees_with_the_local_engine(llama_server, tokenizer):
    from scipy.stats import spearmanr

    from reflectune_hf.models import load_causal_lm
    from reflectune_hf.scoring.engine import Span, mean_token_losses

    rows = short_parity_rows(tokenizer)
    batch = {k: [r.get(k) or "" for r in rows] for k in ("instruction", "input", "output")}
    served = IFDScorer(MODEL, base_url=llama_server.base_url, server_model=llama_server.model, max_concurrency=2)
    assert served.server.mode() == "llamacpp" and served.server.echo_shifted(tokenizer) is True
    remote = served(batch)
    local = IFDScorer(MODEL)(batch)  # the plain local engine: the same ids, no BOS
    assert remote["score_status"] == local["score_status"]
    ok = [i for i, s in enumerate(remote["score_status"]) if s == "ok"]
    assert len(ok) == 4
    assert remote["score_status"][4:] == ["no_scored_token:out_alone"] * (len(rows) - 4)
    for name, tolerance in LOCAL_TOLERANCE.items():
        worst = max(abs(remote[f"loss_{name}"][i] - local[f"loss_{name}"][i]) for i in ok)
        assert worst <= tolerance, (name, worst)
    assert spearmanr([remote["ifd"][i] for i in ok], [local["ifd"][i] for i in ok]).correlation >= 0.95
    rerun = IFDScorer(MODEL, base_url=llama_server.base_url, server_model=llama_server.model)
    assert rerun(batch) == remote and rerun.server.usage["sent"] == 0


@pytest.mark.server
def test_llamacpp_server_answers_are_aligned_not_shifted(llama_server, tokenizer):
    """llama-cpp-python pairs echoed log-probabilities one position off without a leading BOS;
    the client reads them shifted, so "on" after "The cat sat" is likely (read as they are, its
    value is that of " on" after "The cat sat on", below -8)."""
    from reflectune_hf.scoring.engine import Span

    server = StudentServer(llama_server.base_url, llama_server.model, max_concurrency=1)
    text = "The cat sat on the mat."
    ids = tokenizer(text)["input_ids"]
    (values,) = server.span_logprobs(tokenizer, [Span(ids, 1, text=text)])
    assert len(values) == len(ids) - 1
    on = tokenizer.convert_ids_to_tokens(ids).index("Ġon") - 1
    assert values[on] > -3.0  # "on" is among the likeliest words after "The cat sat"


@pytest.mark.server
def test_llamacpp_server_selectit_ratings_are_close_to_the_local_ones(llama_server):
    from reflectune_hf.scoring.selectit import SelectITScorer

    served = SelectITScorer(k=2, base_url=llama_server.base_url, server_model=llama_server.model)(ROWS)
    local = SelectITScorer(k=2)(ROWS)
    assert served["selectit_status"] == ["ok", "ok"] == local["selectit_status"]
    # measured: 0.347 vs 0.397 and 0.761 vs 0.729 (Q4_1 weights on the server, fp32 here)
    for a, b in zip(served["selectit_token"], local["selectit_token"]):
        assert abs(a - b) <= 0.15


def test_an_api_key_no_header_can_carry_is_refused_without_showing_it(monkeypatch):
    """A key with a trailing newline (read from a file) failed every request as a 'connection
    error' after the retries, the rows `request_failed`, instead of saying what is wrong."""
    from reflectune_hf.oracles.base import OracleConfigurationError

    with VllmLoopback() as server:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123\n")
        scorer = IFDScorer(MODEL, base_url=server.base_url, server_model="student", max_retries=0)
        with pytest.raises(OracleConfigurationError, match="line break") as err:
            scorer(ROWS)
        assert "sk-secret" not in str(err.value) and not server.bodies


def test_a_base_url_with_a_bad_port_is_refused_when_the_scorer_is_built():
    """`:80000` built the served student, then its first probe failed with a bare 'Port out of range'."""
    with pytest.raises(ValueError, match=r"base_url has a bad port \(127\.0\.0\.1:80000") as err:
        IFDScorer(MODEL, base_url="http://me:s3cret@127.0.0.1:80000/v1", server_model="student")
    assert "s3cret" not in str(err.value)
