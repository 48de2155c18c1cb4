"""IFDScorer: parity with the reference algorithm and the reference script's own output, edge
rows, batch invariance, the fast path's shape, caching in a new process, multi-process runs."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO
from reflectune_hf.data import ColumnError
from reflectune_hf.scoring.ifd import LOSS_NAMES, SCORE_COLUMNS, IFDScorer, model_identity, pick_device
from reflectune_hf.scoring.reference import reference_scores

LOSS_COLUMNS = [f"loss_{n}" for n in LOSS_NAMES]


@pytest.fixture(scope="module")
def scorer():
    """The default scorer, loaded once, on one CPU thread: the test machine's 2 cores are shared,
    and two OpenMP threads competing with other processes run ~10x slower than one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield IFDScorer().load()
    torch.set_num_threads(threads)


def subprocess_env() -> dict:
    path = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def sibling(scorer, **changes):
    """A scorer with another configuration that reuses `scorer`'s loaded model (same weights)."""
    other = IFDScorer(**changes)
    other._model, other._tokenizer, other._device, other._engine = (
        scorer._model, scorer._tokenizer, scorer._device, scorer._engine)
    return other


def rows_of(batch: dict) -> list[dict]:
    n = len(batch["output"])
    return [{k: batch[k][i] for k in ("instruction", "input", "output")} for i in range(n)]


def batch_of(rows: list[dict]) -> dict:
    return {k: [r.get(k, "") for r in rows] for k in ("instruction", "input", "output")}


def assert_close(got: float, want: float, rel: float):
    assert math.isnan(got) == math.isnan(want), (got, want)
    if not math.isnan(want):
        assert abs(got - want) <= rel * abs(want), (got, want, abs(got - want) / abs(want))


def assert_matches_reference(scorer, rows, got: dict, max_length=None, rel=1e-4):
    want = reference_scores(scorer._model, scorer._tokenizer, rows, scorer.template, max_length or scorer.max_length)
    for i, expected in enumerate(want):
        for name, value in zip(LOSS_COLUMNS, expected):
            assert_close(got[name][i], value, rel)


# -- parity ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_parity_with_reference_script_output(scorer, shared_data):
    """The reference script's own output on rows 0-63 (embedded SmolLM2, vicuna, 2048): every
    loss and ppl of the 32 shortest of those rows within 1e-3 relative."""
    rows = json.loads((shared_data / "cherry_alpaca_5_percent.json").read_text())[:64]
    expected = [json.loads(line) for line in (shared_data / "reference_scores_smollm2_first64.jsonl").open()]
    assert [r["row"] for r in expected] == list(range(64))
    picked = sorted(range(64), key=lambda i: sum(len(v) for v in rows[i].values()))[:32]
    assert sum(1 for i in picked if rows[i].get("input")) >= 4  # rows with an input are covered
    got = scorer(batch_of([rows[i] for i in picked]))
    assert set(got["score_status"]) == {"ok"}
    for k, i in enumerate(picked):
        for name, loss, ppl in zip(LOSS_NAMES, expected[i]["loss"], expected[i]["ppl"]):
            assert_close(got[f"loss_{name}"][k], loss, 1e-3)
            assert_close(got[f"ppl_{name}"][k], ppl, 1e-3)


def test_parity_with_reference_algorithm_on_sample(scorer, sample):
    """Rows with and without input; every loss equals the per-row reference loop's."""
    with_input = [r for r in sample if r["input"]][:4]
    without = [r for r in sample if not r["input"]][:4]
    rows = with_input + without
    got = scorer(batch_of(rows))
    assert set(got["score_status"]) == {"ok"}
    assert_matches_reference(scorer, rows, got)
    for i in range(len(rows)):
        assert got["ifd"][i] == pytest.approx(got["ppl_out_condition"][i] / got["ppl_out_alone"][i])
        assert got["rifd"][i] == pytest.approx(got["ppl_ins_condition"][i] / got["ppl_ins_alone"][i])
        assert got["ifd_loss"][i] == pytest.approx(got["loss_out_condition"][i] / got["loss_out_alone"][i])
        assert got["rifd_loss"][i] == pytest.approx(got["loss_ins_condition"][i] / got["loss_ins_alone"][i])
        assert got["ppl_out_alone"][i] == pytest.approx(math.exp(got["loss_out_alone"][i]))


def test_input_changes_the_conditional_losses_only_as_the_reference_does(scorer):
    rows = [
        {"instruction": "Translate to French.", "input": "Good morning, friends.", "output": "Bonjour, les amis."},
        {"instruction": "Translate to French.", "input": "", "output": "Bonjour, les amis."},
    ]
    got = scorer(batch_of(rows))
    assert got["loss_out_alone"][0] == pytest.approx(got["loss_out_alone"][1], rel=1e-5)  # same text alone
    assert got["loss_out_condition"][0] != pytest.approx(got["loss_out_condition"][1], rel=1e-3)
    assert_matches_reference(scorer, rows, got)


def test_unicode_rows(scorer):
    rows = [
        {"instruction": "Traduis en japonais : « bonjour » 🌸", "input": "", "output": "こんにちは（konnichiwa）🙂"},
        {"instruction": "Erkläre „Gemütlichkeit“.", "input": "Ω ≈ ∑ — naïve café", "output": "Ein Gefühl von Wärme — ça va. 😊"},
        {"instruction": "用一句话总结。", "input": "北京是中国的首都。", "output": "北京是首都。"},
    ]
    got = scorer(batch_of(rows))
    assert got["score_status"] == ["ok"] * 3
    assert_matches_reference(scorer, rows, got)


def test_rifd_scores_the_whole_instruction_and_input_even_when_the_input_repeats_the_instruction(scorer):
    """`ins_condition` scores every token of `instruction + input` after the reverse prompt (as
    `ins_alone` scores them alone). The reference script starts the target at the *last*
    occurrence of the instruction, so an input that repeats the instruction ("Fix" / "Fix the
    typo: ...") moved the instruction into the context (r-IFD over the input only, said `ok`),
    and an empty instruction with an input scored nothing (`no_scored_token`)."""
    from reflectune_hf.prompts import get_scoring_template, reverse_prompt
    from reflectune_hf.scoring.engine import Span, mean_token_losses
    from reflectune_hf.scoring.spans import response_span

    rows = [{"instruction": "Fix", "input": "Fix the typo: teh cat", "output": "The cat sat."},
            {"instruction": "", "input": "What is two plus two?", "output": "Two plus two is four."}]
    got = sibling(scorer)(batch_of(rows))
    template, tok = get_scoring_template("vicuna"), scorer._tokenizer
    for i, row in enumerate(rows):
        assert got["score_status"][i] == "ok", got["score_status"][i]
        reverse = template.no_input.format(instruction=reverse_prompt(row["output"]))
        span = response_span(tok, reverse, row["instruction"] + row["input"], scorer.max_length)
        want = mean_token_losses(scorer._model, [Span(span.ids, span.start)], tok.pad_token_id)[0]
        assert_close(got["loss_ins_condition"][i], want, 1e-4)


# -- undefined values --------------------------------------------------------------------------


def test_empty_output_is_nan_with_status_never_zero(scorer):
    rows = [{"instruction": "Say hi.", "input": "", "output": ""},
            {"instruction": "Say hi.", "input": "", "output": "Hi!"}]
    got = scorer(batch_of(rows))
    assert got["score_status"] == ["empty_output", "ok"]
    for name in SCORE_COLUMNS[:-1]:
        assert math.isnan(got[name][0]), name
        assert math.isfinite(got[name][1]) and got[name][1] > 0, name


def test_blank_output_is_empty_not_scored_ok(scorer):
    """A response of whitespace only is no response: `empty_output`, as SelectIT and the
    reflection stages call it (it used to be scored `ok`, with an IFD < 1 that top-k selected)."""
    rows = [{"instruction": "Write a poem.", "input": "", "output": out} for out in ("  \n  \n", " \t \n\n\n  ")]
    got = sibling(scorer)(batch_of(rows))
    assert got["score_status"] == ["empty_output", "empty_output"]
    assert all(math.isnan(v) for name in SCORE_COLUMNS[:-1] for v in got[name]), got


def test_blank_instruction_is_empty_not_scored_ok(scorer):
    """An instruction of whitespace only (and no input) is no instruction: `empty_instruction`,
    as SelectIT calls it, every score NaN (it was scored `ok` when it spanned two tokens, with an
    IFD < 1 that `ifd_below(1)` and top-k selected, or got a misleading `no_scored_token`)."""
    rows = [{"instruction": ins, "input": inp, "output": "A fine answer."}
            for ins, inp in ((" \n\n \t\n ", ""), ("", ""), ("   ", " \n"), ("", "What is 2+2?"))]
    got = sibling(scorer)(batch_of(rows))
    assert got["score_status"] == ["empty_instruction"] * 3 + ["ok"]
    assert all(math.isnan(got[name][i]) for name in SCORE_COLUMNS[:-1] for i in range(3)), got
    rows = [{"instruction": " ", "input": "", "output": " "}]
    assert sibling(scorer)(batch_of(rows))["score_status"] == ["empty_instruction;empty_output"]


def test_text_that_is_not_utf8_gets_a_status_not_a_crash_of_the_batch(scorer):
    """A lone surrogate (a streaming dataset from a generator of decoded JSON carries them; Arrow
    refuses them) made the tokenizer raise a TypeError that stopped the whole batch; the row now
    says `invalid_text`, as the reflection and Tuna stages say it, and the others are scored."""
    rows = [{"instruction": "Say hi\ud800", "input": "", "output": "Hi there."},
            {"instruction": "Say hi.", "input": "\udc80", "output": "Hi there."},
            {"instruction": "Say hi.", "input": "", "output": "Hi there."}]
    got = sibling(scorer)(batch_of(rows))
    assert got["score_status"] == ["invalid_text", "invalid_text", "ok"]
    assert all(math.isnan(got[name][i]) for name in SCORE_COLUMNS[:-1] for i in range(2))


def test_long_output_truncates_the_instruction_target_away(scorer):
    """With a response longer than max_length, the reverse text holds no instruction token: the
    r-IFD losses are NaN with a status (the reference's all-ignored labels), IFD stays defined."""
    short = sibling(scorer, max_length=96)
    rows = [{"instruction": "Describe the sea.", "input": "",
             "output": " ".join(["The sea is wide and blue and deep."] * 20)},
            {"instruction": "Name a colour.", "input": "", "output": "Blue."}]
    got = short(batch_of(rows))
    assert got["score_status"][0] == "no_scored_token:ins_alone;no_scored_token:ins_condition"
    assert math.isnan(got["loss_ins_condition"][0]) and math.isnan(got["rifd"][0]) and math.isnan(got["rifd_loss"][0])
    assert math.isfinite(got["ifd"][0]) and math.isfinite(got["loss_out_condition"][0])
    assert got["score_status"][1] == "ok"
    assert_matches_reference(short, rows, got, max_length=96)


def test_non_finite_losses_and_failed_sequences_get_a_status(scorer, monkeypatch):
    import reflectune_hf.scoring.ifd as scoring

    def fake(model, spans, pad_id, max_tokens, share_prefixes=True, plain=False):
        values = [1.0] * len(spans)
        values[2] = math.inf  # row 0, ins_condition
        values[5] = RuntimeError("out of memory")  # row 1, out_alone
        return values

    monkeypatch.setattr(scoring, "mean_token_losses", fake)
    rows = [{"instruction": "A.", "input": "", "output": "B."}, {"instruction": "C.", "input": "", "output": "D."}]
    got = sibling(scorer)(batch_of(rows))
    assert got["score_status"] == ["non_finite:ins_condition", "error:RuntimeError: out of memory"]
    assert math.isnan(got["rifd"][0]) and got["ifd"][0] == 1.0
    assert math.isnan(got["ifd"][1]) and got["rifd"][1] == 1.0


def test_zero_losses_get_a_status_not_a_silent_nan_or_zero_ratio(scorer, monkeypatch):
    """A mean loss of 0 (every scored token certain: a served student's logprobs of 0.0) makes
    a loss ratio 0/x = 0 or x/0: the row says so instead of `ok` with a NaN or 0 ratio."""
    import reflectune_hf.scoring.ifd as scoring

    def fake(model, spans, pad_id, max_tokens, share_prefixes=True, plain=False):
        values = [1.0] * len(spans)
        values[1] = 0.0  # row 0, out_alone: ifd_loss = x / 0
        values[6] = 0.0  # row 1, ins_condition: rifd_loss = 0 / x
        return values

    monkeypatch.setattr(scoring, "mean_token_losses", fake)
    rows = [{"instruction": "A.", "input": "", "output": "B."}, {"instruction": "C.", "input": "", "output": "D."}]
    got = sibling(scorer)(batch_of(rows))
    assert got["score_status"] == ["non_positive:out_alone", "non_positive:ins_condition"]
    assert math.isnan(got["ifd_loss"][0]) and math.isnan(got["rifd_loss"][1])


def test_max_length_beyond_the_model_context_is_a_clear_error():
    """SmolLM2 has 8192 positions: a longer max_length would score texts past them (garbage for
    rotary models, an index error for learned positions): refused when the model loads."""
    with pytest.raises(ValueError, match=r"max_length=9000 exceeds the context .* set max_length <= 8192"):
        IFDScorer(max_length=9000)({"instruction": ["Name a colour."], "output": ["Blue."]})


def test_bad_columns_raise_clear_errors(scorer):
    with pytest.raises(ColumnError, match="output"):
        scorer({"instruction": ["x"]})
    with pytest.raises(ColumnError, match="instruction"):
        scorer({"instruction": [3], "output": ["y"]})


# -- exactness of the fast path ----------------------------------------------------------------


def test_batch_composition_does_not_change_scores(scorer, sample):
    """Rows scored alone (map batch size 1), all together, and together with a token budget that
    forces one sequence per forward pass: every loss within 1e-5 relative (fp32; the ppl ratios
    exponentiate loss differences, so 5e-5)."""
    ds = sample.select(range(6))  # fresh siblings: a scorer does not score a span twice
    alone = ds.map(sibling(scorer), batched=True, batch_size=1, load_from_cache_file=False)
    together = ds.map(sibling(scorer), batched=True, batch_size=6, load_from_cache_file=False)
    one_per_pass = ds.map(sibling(scorer, max_tokens_per_batch=1), batched=True, batch_size=6,
                          load_from_cache_file=False)
    all_in_one_pass = ds.map(sibling(scorer, max_tokens_per_batch=16384), batched=True, batch_size=6,
                             load_from_cache_file=False)
    for other in (together, one_per_pass, all_in_one_pass):
        for name in LOSS_COLUMNS + ["ifd", "rifd"]:
            for a, b in zip(alone[name], other[name]):
                assert_close(b, a, 1e-5 if name in LOSS_COLUMNS else 5e-5)


def test_token_budget_follows_the_device_unless_given():
    """`max_tokens_per_batch=None` means 1024 padded tokens per pass on CPU (larger micro-batches
    are slower there) and 16384 on a GPU; an explicit value always wins."""
    from reflectune_hf.scoring.ifd import CPU_TOKENS_PER_BATCH, GPU_TOKENS_PER_BATCH

    scorer = IFDScorer()
    for device, budget in (("cpu", CPU_TOKENS_PER_BATCH), ("cuda", GPU_TOKENS_PER_BATCH),
                           ("cuda:1", GPU_TOKENS_PER_BATCH)):
        scorer._device = device
        assert scorer.token_budget == budget
    explicit = IFDScorer(max_tokens_per_batch=333)
    explicit._device = "cuda"
    assert explicit.token_budget == 333 and (CPU_TOKENS_PER_BATCH, GPU_TOKENS_PER_BATCH) == (1024, 16384)
    assert IFDScorer().fingerprint == IFDScorer(max_tokens_per_batch=4096).fingerprint, "scores do not depend on it"
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        IFDScorer(max_tokens_per_batch=0)


def test_head_runs_only_on_scored_positions(scorer):
    """The LM head never sees a [batch, seq, hidden] tensor and sees each scored token once."""
    seen = []
    handle = scorer._model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    try:
        rows = [{"instruction": "List three fruits.", "input": "", "output": "Apple, pear, plum."},
                {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]
        sibling(scorer)(batch_of(rows))
    finally:
        handle.remove()
    assert seen and all(len(shape) == 2 for shape in seen)
    tok = scorer._tokenizer
    n_out = sum(len(tok(r["output"])["input_ids"]) for r in rows)
    n_ins = sum(len(tok(r["instruction"] + r["input"])["input_ids"]) for r in rows)
    # alone: all tokens but the first; conditional: the target's tokens (boundary-dependent, about the same)
    assert 2 * (n_out + n_ins) - 8 <= sum(s[0] for s in seen) <= 2 * (n_out + n_ins) + 4


def test_spans_scored_before_are_reused_not_scored_again(scorer, monkeypatch):
    """The recycle job scores four splits that share most texts: a span the scorer already scored
    (same tokens, same first scored token) is not sent to the model again, inside a call or
    across calls, and its loss is the one computed then; the memory is not pickled, so it
    changes neither the fingerprint nor what a `num_proc` worker computes."""
    from datasets.fingerprint import Hasher

    import reflectune_hf.scoring.ifd as scoring

    sent = []
    real = scoring.mean_token_losses

    def recording(model, spans, *args, **kwargs):
        sent.append(len(spans))
        return real(model, spans, *args, **kwargs)

    monkeypatch.setattr(scoring, "mean_token_losses", recording)
    rows = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "Their sum is 5."},
            {"instruction": "Say hi in French.", "input": "", "output": "Bonjour !"}]
    fresh = sibling(scorer)
    first = fresh(batch_of(rows))
    assert sent == [12] and fresh.reused_spans == 0
    changed = rows[:2] + [{**rows[2], "output": "Salut !"}, rows[0]]
    again = fresh(batch_of(changed))
    # rows 0, 1 and 3 (a copy of row 0): all four spans known; row 2: its instruction alone
    assert sent == [12, 3] and fresh.reused_spans == 13
    for column in LOSS_COLUMNS:
        assert again[column][:2] == first[column][:2] and again[column][3] == first[column][0]
    want = sibling(scorer)(batch_of(changed))
    for column in LOSS_COLUMNS + ["ifd", "rifd"]:
        for a, b in zip(again[column], want[column]):
            assert_close(a, b, 5e-5)
    copy = pickle.loads(pickle.dumps(fresh))
    assert copy._memo is None and copy.reused_spans == 0
    assert Hasher.hash(fresh) == Hasher.hash(IFDScorer())


def test_a_full_span_memory_keeps_the_known_losses_of_the_call_that_fills_it(scorer, monkeypatch):
    """When a call's new spans overflow the memory it is cleared; the spans of that call already
    known must still get their losses (a KeyError here once failed the whole batch)."""
    import reflectune_hf.scoring.ifd as scoring

    rows = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
            {"instruction": "Say hi in French.", "input": "", "output": "Bonjour !"}]
    fresh = sibling(scorer)
    first = fresh(batch_of(rows[:1]))
    monkeypatch.setattr(scoring, "MEMO_SPANS", len(fresh._memo) + 1)  # the next new spans overflow it
    both = fresh(batch_of(rows))
    assert fresh.reused_spans == 4
    for column in LOSS_COLUMNS:
        assert both[column][0] == first[column][0]
    assert len(fresh._memo) <= scoring.MEMO_SPANS


# -- caching, pickling, devices ------------------------------------------------------------------


def test_state_and_fingerprint(scorer, tmp_path):
    from datasets.fingerprint import Hasher

    state = pickle.loads(pickle.dumps(scorer))
    assert state._model is None and state._tokenizer is None
    assert Hasher.hash(IFDScorer()) == Hasher.hash(IFDScorer()) == Hasher.hash(state)
    for change in ({"template": "alpaca"}, {"max_length": 1024}, {"dtype": "bfloat16"}):
        assert Hasher.hash(IFDScorer(**change)) != Hasher.hash(IFDScorer()), change
    with pytest.raises(ValueError, match="template"):
        IFDScorer(template="nope")

    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"1234")
    (model_dir / "README.md").write_text("not part of the identity")
    before = model_identity(str(model_dir))
    (model_dir / "README.md").write_text("changed")
    assert model_identity(str(model_dir)) == before
    (model_dir / "model.safetensors").write_bytes(b"12345")
    assert model_identity(str(model_dir)) != before
    assert model_identity("org/not-cached-model") == {"hub_id": "org/not-cached-model", "revision": None}


def test_pick_device_spreads_ranks_over_gpus(monkeypatch):
    import torch

    assert pick_device(None, 1) == ("cuda:1" if torch.cuda.device_count() > 1 else pick_device(None, None))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [pick_device(None, r) for r in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert pick_device("cpu", 1) == "cpu"
    assert pick_device(None, None) == "cuda"


def _run_python(code: str, timeout: int = 300) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout.strip().splitlines()[-1]


def test_repeated_map_in_a_new_process_is_served_from_cache_without_model_load():
    script = """
        import json, sys
        import reflectune_hf.scoring.ifd as scoring
        from reflectune_hf import load_sample
        from reflectune_hf.scoring.ifd import IFDScorer
        if sys.argv[-1] == "second":
            def refuse(*args, **kwargs):
                raise AssertionError("the model was loaded")
            scoring.load_causal_lm = refuse
        ds = load_sample().select(range(3))
        scorer = IFDScorer(max_length=512)
        out = ds.map(scorer, batched=True)
        print(json.dumps({"fp": out._fingerprint, "ifd": list(out["ifd"]), "loaded": scorer._model is not None,
                          "files": [f["filename"] for f in out.cache_files]}))
    """
    first = json.loads(_run_python(script.replace('sys.argv[-1] == "second"', "False")))
    second = json.loads(_run_python(script.replace('sys.argv[-1] == "second"', "True")))
    assert first["loaded"] and not second["loaded"]
    assert second["fp"] == first["fp"] and second["ifd"] == first["ifd"]
    assert second["files"] == first["files"]


@pytest.mark.slow
def test_num_proc_map_with_rank_equals_single_process(scorer, sample):
    ds = sample.select(range(4))
    single = ds.map(scorer, batched=True, batch_size=2, load_from_cache_file=False)
    multi = ds.map(IFDScorer(), batched=True, batch_size=2, num_proc=2, with_rank=True, load_from_cache_file=False)
    assert list(multi["id"]) == list(single["id"])
    assert list(multi["score_status"]) == list(single["score_status"]) == ["ok"] * 4
    for name in LOSS_COLUMNS:
        for a, b in zip(single[name], multi[name]):
            assert_close(b, a, 1e-5)


@pytest.mark.slow
def test_score_script_two_processes_equal_one(scorer, tmp_path, sample):
    """`torchrun --nproc_per_node 2 scripts/score.py` (the wrapper of `cli.score_job`: two gloo CPU
    ranks, one shard each) writes the same table as one process scoring every row."""
    rows = sample.select(range(5))
    data, out = tmp_path / "rows.jsonl", tmp_path / "two"
    rows.to_json(str(data), lines=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "scripts/score.py",
           "--data", str(data), "--max_length", "512", "--device", "cpu", "--output_dir", str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "with 2 process(es)" in done.stderr
    assert "Scoring (process 1)" in done.stderr  # the second rank really scored its shard
    from datasets import load_from_disk

    got = load_from_disk(str(out / "arrow")).to_list()  # the folder `reflectune score` writes
    assert (out / "README.md").is_file()
    want = sibling(scorer, max_length=512)(batch_of(list(rows)))
    assert [r["id"] for r in got] == list(range(5))
    assert [r["instruction"] for r in got] == list(rows["instruction"])
    assert [r["score_status"] for r in got] == want["score_status"]
    for name in LOSS_COLUMNS + ["ifd", "rifd"]:
        for i, row in enumerate(got):
            assert_close(row[name], want[name][i], 1e-5)


def test_bench_prints_one_json_line_with_speed_parity_and_memory():
    """`scripts/bench_ifd.py` on a few bundled rows: one JSON line with both rates, the parity and
    the resident memory per batch (the targets are read from it by people, not asserted here)."""
    from reflectune_hf.data import sample_path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "scripts" / "bench_ifd.py"), "--rows", "4", "--batch-size", "2",
                          "--max-length", "256", "--threads", "1", "--data", str(sample_path())],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["rows"] == 4 and result["speedup"] > 0 and result["max_rel_diff"] < 1e-3
    assert result["nan_mismatches"] == 0 and result["rss_mb_first_batch"] > 0 and result["rss_growth"] > 0


def test_num_threads_is_scoped_to_the_scoring_work(scorer, monkeypatch):
    """An explicit `num_threads` applies while the losses are computed, and the process's torch
    thread count is back to what it was afterwards (also after a failure); no `num_threads`
    leaves it alone."""
    import torch

    import reflectune_hf.scoring.ifd as scoring

    seen = []
    real = scoring.mean_token_losses

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "mean_token_losses", recording)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        sibling(scorer, num_threads=1).score(["Name a colour."], [""], ["Blue."])
        assert seen == [1] and torch.get_num_threads() == 2
        sibling(scorer).score(["Name a colour."], [""], ["Blue."])
        assert seen == [1, 2] and torch.get_num_threads() == 2
        monkeypatch.setattr(scoring, "mean_token_losses", lambda *a, **k: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            sibling(scorer, num_threads=1).score(["Name a colour."], [""], ["Blue."])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _engine_spans(scorer) -> list:
    from reflectune_hf.scoring.engine import Span

    tok = scorer._tokenizer
    prefix = tok("A chat between a curious user and an artificial intelligence assistant. USER: ")["input_ids"]
    spans = []
    for i, text in enumerate(["Name a colour. ASSISTANT: Blue.", "Say hi in French. ASSISTANT: Bonjour !",
                              "Count to three. ASSISTANT: One, two, three."]):
        ids = prefix + tok(text, add_special_tokens=False)["input_ids"]
        spans += [Span(ids, start=len(prefix), group=0), Span(ids, start=1, group=i + 1)]
    return spans


def test_plain_path_gives_the_fast_paths_losses(scorer):
    """The fallback (the model's own forward with `logits_to_keep`, no class swap) and the fast
    path (body + head on scored positions + shared prefixes) agree within float32 noise."""
    from reflectune_hf.scoring.engine import EnginePath, mean_token_losses

    assert scorer._engine == EnginePath(plain=False, share_prefixes=True), "the embedded model takes the fast path"
    spans = _engine_spans(scorer)
    pad = scorer._tokenizer.pad_token_id
    fast = mean_token_losses(scorer._model, spans, pad, 1024, share_prefixes=True)
    plain = mean_token_losses(scorer._model, spans, pad, 1024, plain=True)
    assert all(isinstance(x, float) for x in fast + plain)
    for a, b in zip(fast, plain):
        assert math.isclose(a, b, rel_tol=1e-4), (fast, plain)
    whole = sibling(scorer)
    whole._engine = EnginePath(plain=True, share_prefixes=False)
    batch = {"instruction": ["Name a colour.", "Add 2 and 3."], "input": ["", ""], "output": ["Blue.", "5"]}
    got, want = whole(batch), sibling(scorer)(batch)
    for column in LOSS_COLUMNS:
        for a, b in zip(got[column], want[column]):
            assert_close(a, b, rel=1e-4)


def test_unknown_version_or_model_type_takes_the_plain_path(scorer, monkeypatch):
    import reflectune_hf.scoring.engine as engine

    assert engine.fast_path_allowed(scorer._model)
    monkeypatch.setattr(engine, "FAST_PATH_MODEL_TYPES", frozenset({"some-other-arch"}))
    assert not engine.fast_path_allowed(scorer._model)
    assert engine.check_model(scorer._model) == engine.EnginePath(plain=True, share_prefixes=False)
    monkeypatch.undo()
    monkeypatch.setattr(engine, "FAST_PATH_TRANSFORMERS", ("0.1.0", "0.2.0"))
    assert engine.check_model(scorer._model) == engine.EnginePath(plain=True, share_prefixes=False)


def test_logits_that_are_not_the_head_of_the_hidden_state_take_the_plain_path(scorer):
    """A model whose forward changes its logits after the head (here: a hook scaling them) is not
    `lm_head(hidden)`: it takes the plain path, whose losses are those of its real logits."""
    import torch
    import torch.nn.functional as F

    from reflectune_hf.scoring.engine import EnginePath, check_model, mean_token_losses

    model = scorer._model

    def scale(module, args, output):
        output.logits = output.logits * 0.5
        return output

    handle = model.register_forward_hook(scale)
    try:
        assert check_model(model) == EnginePath(plain=True, share_prefixes=False)
        span = _engine_spans(scorer)[1]
        got = mean_token_losses(model, [span], scorer._tokenizer.pad_token_id, plain=True)[0]
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([span.ids])).logits[0].float()
        want = F.cross_entropy(logits[span.start - 1: -1], torch.tensor(span.ids[span.start:])).item()
    finally:
        handle.remove()
    assert math.isclose(got, want, rel_tol=1e-5), (got, want)
