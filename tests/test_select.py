"""Selection: V2 against the reference decision tree, V1, top-k, predicates, errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, DatasetDict, Value, concatenate_datasets
from datasets.fingerprint import Hasher
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synthetic_variants import is_valid, make_variants

from reflectune_hf.data import ColumnError
from reflectune_hf.selection.select import (
    INSTRUCTION_NOT_REFLECTED,
    NOT_REFLECTED,
    VARIANT_SPLITS,
    explain_v2,
    ifd_below,
    is_scored,
    rifd_below,
    select_v1,
    select_v2,
    top_k_by,
)

ORI, Q, A, QA = VARIANT_SPLITS


# --------------------------------------------------------------------------- reference tree


def reference_tree(ori, q, a, qa, require_below_one):
    """Literal transcription of the V2 decision tree of Reflection_Tuning's
    selection_code/get_select_data.py (ppl ratios): returns the split appended, or None.

    The reference appends only in its first and third branches; the other two are counted and
    dropped. `require_below_one=False` removes the `< 1` checks (the paper's form)."""
    below = (lambda x: x["rifd"] < 1 and x["ifd"] < 1) if require_below_one else (lambda x: True)
    if q["ifd"] > ori["ifd"]:  # instruction improved: Q kept
        if qa["rifd"] < q["rifd"]:  # reflected response easier to guess from: QA
            if below(qa):
                return QA
        else:
            pass  # Q without reflected response: discarded
    else:  # instruction not improved: ori kept
        if a["rifd"] < ori["rifd"]:
            if below(a):
                return A
        else:
            pass  # ori without reflected response: discarded
    return None


def guarded_tree(ori, q, a, qa, require_below_one):
    """`reference_tree` plus select_v2's documented rules for missing scores and unreflected rows."""
    if not (is_valid(ori["ifd"]) and is_valid(q["ifd"])):
        return None  # phase 1 cannot be decided
    q_is_copy = all(q[k] == ori[k] for k in ("instruction", "input", "output"))
    q_is_copy = q_is_copy or q.get("reflection_status") in INSTRUCTION_NOT_REFLECTED  # no new instruction
    keep_q = q["ifd"] > ori["ifd"] and not q_is_copy
    kept, twin = (q, qa) if keep_q else (ori, a)
    if not (is_valid(kept["rifd"]) and is_valid(twin["rifd"]) and is_valid(twin["ifd"])):
        return None
    if twin.get("reflection_status") in NOT_REFLECTED or twin["output"] == kept["output"]:
        return None  # the twin's response was not reflected
    if q_is_copy:
        q = dict(q, ifd=ori["ifd"])  # a copy of ori cannot win phase 1
    return reference_tree(ori, q, a, qa, require_below_one)


# --------------------------------------------------------------------------- strategies

CLEAN = st.one_of(st.sampled_from([0.3, 0.5, 0.9, 0.99, 1.0, 1.01, 1.4]), st.floats(0.05, 2.5))
MISSING = st.sampled_from([float("nan"), None, 0.0, float("inf"), -0.4])
ANY = st.one_of(CLEAN, CLEAN, MISSING)


def _row(scores, texts, statuses=st.just("ok")):
    return st.fixed_dictionaries({"ifd": scores, "rifd": scores, "output": texts, "instruction": texts,
                                  "input": st.just(""), "reflection_status": statuses})


def _variants_from_rows(rows: list[tuple], seed: int) -> DatasetDict:
    rng = np.random.default_rng(seed)
    splits = {}
    for j, name in enumerate(VARIANT_SPLITS):
        order = rng.permutation(len(rows)).tolist()  # each split in its own row order
        cols = {"id": order}
        for key in ("instruction", "input", "output", "ifd", "rifd", "reflection_status"):
            cols[key] = [rows[i][j][key] for i in order]
        splits[name] = Dataset.from_dict(cols)
    return DatasetDict(splits)


def _check_against(tree, rows, seed, require_below_one):
    variants = _variants_from_rows(rows, seed)
    got = select_v2(variants, require_below_one=require_below_one)
    expected = {i: tree(*r, require_below_one) for i, r in enumerate(rows)}
    assert dict(zip(got["id"], got["source"])) == {i: s for i, s in expected.items() if s}
    assert list(got["id"]) == [i for i in variants[ORI]["id"] if expected[i]]  # origin order
    for row in got:
        chosen = rows[row["id"]][VARIANT_SPLITS.index(row["source"])]
        assert (row["output"], row["ifd"], row["rifd"]) == (chosen["output"], chosen["ifd"], chosen["rifd"])


@pytest.mark.parametrize("require_below_one", [True, False])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.tuples(*[_row(CLEAN, st.sampled_from(["x"]))] * 4), min_size=1, max_size=60),
       seed=st.integers(0, 2**16))
def test_select_v2_equals_reference_tree_on_clean_scores(rows, seed, require_below_one):
    # Every score valid, every response really reflected: the bare reference tree decides.
    rows = [tuple(dict(v, output=f"{name}-{i}", instruction=f"{name}-{i}") for name, v in zip(VARIANT_SPLITS, r))
            for i, r in enumerate(rows)]
    _check_against(reference_tree, rows, seed, require_below_one)


@pytest.mark.parametrize("require_below_one", [True, False])
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.tuples(*[_row(ANY, st.sampled_from(["a", "b"]), st.sampled_from(
           ["ok", "ok", "instruction_fallback", *sorted(NOT_REFLECTED), None]))] * 4), min_size=1, max_size=60),
       seed=st.integers(0, 2**16))
def test_select_v2_equals_guarded_reference_tree_with_missing_scores(rows, seed, require_below_one):
    _check_against(guarded_tree, rows, seed, require_below_one)


def test_reference_zero_score_bug_input_is_not_selected():
    # The reference scorer returns 0 on an exception: A (rifd 0, ifd 0) beats ori and passes
    # every "< 1" check there. Here 0 is a missing score and the row is not selected.
    scores = ({"ifd": 0.5, "rifd": 0.8}, {"ifd": 0.4, "rifd": 0.7}, {"ifd": 0.0, "rifd": 0.0}, {"ifd": 0.3, "rifd": 0.5})
    rows = [tuple(dict(s, instruction=f"i{j}", input="", output=f"o{j}", reflection_status="ok")
                  for j, s in enumerate(scores))]
    assert reference_tree(*rows[0], True) == A
    variants = _variants_from_rows(rows, 0)
    got = select_v2(variants)
    # Nothing selected: a clean 0-row Dataset with the columns of a selection, usable downstream.
    assert len(got) == 0 and got.column_names == [*variants[A].column_names, "source"]
    assert got.features["ifd"] == Value("float64") and got.features["source"] == Value("string")
    assert len(got.add_column("x", [])) == 0 and got.to_list() == []


def test_select_v2_on_zero_row_variants(variants):
    empty = DatasetDict({s: ds.select([]) for s, ds in variants.items()})
    got = select_v2(empty)
    assert len(got) == 0 and got.column_names == [*variants[A].column_names, "source"]
    assert len(got.add_column("x", [])) == 0 and len(explain_v2(empty)) == 0


def test_select_v2_casts_reflected_splits_to_one_schema(variants):
    # Splits scored or built apart: float32 vs float64 scores, int32 vs int64 ids.
    narrow = variants[A].cast_column("ifd", Value("float32")).cast_column("id", Value("int32"))
    mixed = DatasetDict({**variants, A: narrow})
    got, expected = select_v2(mixed, require_below_one=False), select_v2(variants, require_below_one=False)
    assert {"reflect_response", "reflect_both"} == set(got["source"])
    assert got.features["ifd"] == Value("float64") and got.features["id"] == Value("int64")
    assert list(got["id"]) == list(expected["id"]) and list(got["source"]) == list(expected["source"])
    from_a = [(r, e) for r, e in zip(got, expected) if e["source"] == A]
    assert all(r["ifd"] == pytest.approx(e["ifd"], rel=1e-6) for r, e in from_a)
    # No lossless common type: a clear error naming the column and both types.
    clash = DatasetDict({**variants, A: variants[A].add_column("note", ["x"] * 40),
                         QA: variants[QA].add_column("note", [0.5] * 40)})
    with pytest.raises(ColumnError, match=r"'note' is string in split 'reflect_response' but float64 in split 'refl"):
        select_v2(clash)


def test_select_v2_all_null_score_column_in_one_split():
    # A split whose scores are all None has an Arrow null-typed column; the output still builds.
    row = {"instruction": "i", "input": "", "reflection_status": "ok"}
    rows = [(dict(row, output="o", ifd=0.3, rifd=0.9), dict(row, output="o", ifd=0.3, rifd=0.9),
             dict(row, output="a", ifd=0.3, rifd=None), dict(row, output="b", ifd=0.3, rifd=0.3))]
    assert len(select_v2(_variants_from_rows(rows, 0))) == 0
    rows[0][1].update(ifd=0.5, instruction="j")  # now Q wins phase 1 and QA is selected
    got = select_v2(_variants_from_rows(rows, 0))
    assert list(got["source"]) == ["reflect_both"] and list(got["rifd"]) == [0.3]


# --------------------------------------------------------------------------- realistic variants


@pytest.fixture(scope="module")
def variants():
    from reflectune_hf import load_sample

    return make_variants(load_sample(), seed=3)


def test_select_v2_on_sample_variants_keeps_chosen_rows(variants):
    strict = select_v2(variants)
    paper = select_v2(variants, require_below_one=False)
    assert 0 < len(strict) <= len(paper) < 40
    assert set(strict["id"]) <= set(paper["id"])
    assert {"instruction", "input", "output", "ifd", "rifd", "reflection_status", "score_status", "source"} <= set(
        paper.column_names)
    by_id = {s: {r["id"]: r for r in variants[s]} for s in VARIANT_SPLITS}
    origin_order = [i for i in variants[ORI]["id"] if i in set(paper["id"])]
    assert list(paper["id"]) == origin_order
    for row in paper:
        chosen = by_id[row["source"]][row["id"]]
        assert {k: row[k] for k in chosen} == chosen
        assert row["score_status"] == "ok" and math.isfinite(row["ifd"]) and math.isfinite(row["rifd"])
        assert row["reflection_status"] not in NOT_REFLECTED
    for row in strict:
        assert row["ifd"] < 1 and row["rifd"] < 1
    outcomes = explain_v2(variants)
    assert sorted(i for i, o in zip(outcomes["id"], outcomes["v2_outcome"]) if o in (A, QA)) == sorted(strict["id"])


def test_ratio_loss_reads_loss_columns(variants):
    ppl, loss = select_v2(variants, ratio="ppl"), select_v2(variants, ratio="loss")
    swapped = DatasetDict({s: ds.rename_columns({"ifd": "t1", "rifd": "t2"}).rename_columns(
        {"ifd_loss": "ifd", "rifd_loss": "rifd"}) for s, ds in variants.items()})
    assert list(select_v2(swapped)["id"]) == list(loss["id"]) and len(loss) > 0
    assert all(r["ifd_loss"] < 1 and r["rifd_loss"] < 1 for r in loss)
    assert all(r["ifd"] < 1 and r["rifd"] < 1 for r in ppl)
    with pytest.raises(ValueError, match="ratio"):
        select_v2(variants, ratio="log")


def test_unscored_and_unreflected_twins_are_not_selected():
    base = {"instruction": "q", "input": "", "ifd": 0.6, "rifd": 0.8, "reflection_status": "ok", "score_status": "ok"}
    twin = dict(base, output="better", ifd=0.5, rifd=0.4)
    cases = {
        0: ({}, A),  # the normal case: A wins
        1: ({"score_status": "empty_output"}, None),  # finite numbers, but not scored
        2: ({"reflection_status": "output_fallback"}, None),  # response fell back
        3: ({"output": "orig"}, None),  # same text as the kept pair: float noise must not pick it
    }
    rows = [(dict(base, output="orig"), dict(base, output="orig"), dict(twin, **change), dict(twin))
            for change, _ in cases.values()]
    variants = DatasetDict({
        name: Dataset.from_dict({"id": list(cases), **{k: [r[j][k] for r in rows] for k in rows[0][j]}})
        for j, name in enumerate(VARIANT_SPLITS)})
    got = select_v2(variants)
    assert dict(zip(got["id"], got["source"])) == {i: s for i, (_, s) in cases.items() if s}


def test_a_failed_instruction_reflection_is_never_kept_in_phase_1():
    """With compress=False a failed instruction reflection holds the origin with its input merged
    into the instruction: its text differs, and a higher IFD picked it (`reflect_both` selected
    with a failed instruction reflection)."""
    ori = {"instruction": "Translate to French.", "input": "Hello", "output": "Bonjour", "ifd": 0.8, "rifd": 0.9,
           "reflection_status": ""}
    merged = dict(ori, instruction="Translate to French.\nHello", input="", ifd=0.81)
    twin = {"output": "Bonjour !", "ifd": 0.5, "rifd": 0.4, "reflection_status": "ok"}
    cases = {0: "failed", 1: "truncated", 2: "oracle_error", 3: "output_fallback", 4: "ok"}
    rows = [(ori, dict(merged, reflection_status=status), dict(ori, **twin), dict(merged, **twin))
            for status in cases.values()]
    variants = DatasetDict({
        name: Dataset.from_dict({"id": list(cases), **{k: [r[j][k] for r in rows] for k in rows[0][j]}})
        for j, name in enumerate(VARIANT_SPLITS)})
    kept = dict(zip(*(explain_v2(variants)[c] for c in ("id", "v2_kept"))))
    assert kept == {0: "origin", 1: "origin", 2: "origin", 3: "reflect_instruction", 4: "reflect_instruction"}


def test_an_instruction_fallback_is_never_kept_in_phase_1():
    """`instruction_fallback` (no new instruction: the origin's, next to the answer written for the
    lost one) won phase 1 on the IFD its new answer gave: V2 kept a pair that was never (x1, y1)."""
    ori = {"instruction": "Name a bird.", "input": "", "output": "Robin.", "ifd": 0.6, "rifd": 0.9,
           "reflection_status": ""}
    q = dict(ori, output="Sparrows live in cities.", ifd=0.7)
    twin = {"ifd": 0.5, "rifd": 0.4, "reflection_status": "ok"}
    rows = [(ori, dict(q, reflection_status=status), dict(ori, output="A robin.", **twin),
             dict(q, output="Sparrows are birds.", **twin)) for status in ("instruction_fallback", "ok")]
    variants = DatasetDict({
        name: Dataset.from_dict({"id": [0, 1], **{k: [r[j][k] for r in rows] for k in rows[0][j]}})
        for j, name in enumerate(VARIANT_SPLITS)})
    assert explain_v2(variants)["v2_kept"] == ["origin", "reflect_instruction"]


def test_select_v2_clear_errors(variants):
    with pytest.raises(ColumnError, match=r"split\(s\) \['reflect_both'\]"):
        select_v2(DatasetDict({s: variants[s] for s in VARIANT_SPLITS[:3]}))
    with pytest.raises(ColumnError, match=r"'reflect_response'.*\['rifd'\]"):
        select_v2(DatasetDict({**variants, A: variants[A].remove_columns("rifd")}))
    with pytest.raises(ColumnError, match=r"not aligned by 'id'.*'reflect_both' lacks 1 id"):
        select_v2(DatasetDict({**variants, QA: variants[QA].select(range(39))}))
    with pytest.raises(ColumnError, match="has 1 id"):
        extra = variants[Q].map(lambda r: {"id": r["id"] + 1000 if r["id"] == 5 else r["id"]})
        select_v2(DatasetDict({**variants, Q: extra}))
    with pytest.raises(ColumnError, match="duplicate ids"):
        select_v2(DatasetDict({**variants, A: variants[A].map(lambda r: {"id": 0 if r["id"] == 1 else r["id"]})}))
    with pytest.raises(ColumnError, match="must be numeric"):
        select_v2(DatasetDict({**variants, ORI: variants[ORI].cast_column("ifd", Value("string"))}))


def test_select_v1_keeps_every_row_and_status(variants):
    v1 = select_v1(variants)
    assert len(v1) == len(variants[QA]) and set(v1["source"]) == {"reflect_both"}
    assert list(v1["reflection_status"]) == list(variants[QA]["reflection_status"])
    with pytest.raises(ColumnError, match="reflect_both"):
        select_v1(DatasetDict({ORI: variants[ORI]}))


# --------------------------------------------------------------------------- top-k, predicates

SCORES = st.lists(st.one_of(st.floats(0.01, 3.0), st.sampled_from([0.5, 1.0, 1.0000001]), MISSING), max_size=60)


@settings(max_examples=60, deadline=None)
@given(scores=SCORES, fraction=st.floats(0.01, 1.0), max_value=st.sampled_from([1.0, 0.8, None]))
def test_top_k_by_fraction_never_returns_missing_or_above_max(scores, fraction, max_value):
    ds = Dataset.from_dict({"id": list(range(len(scores))), "ifd": scores}, features=None)
    got = top_k_by(ds, "ifd", fraction=fraction, max_value=max_value)
    values = list(got["ifd"])
    eligible = [i for i, v in enumerate(scores) if is_valid(v) and (max_value is None or v <= max_value)]
    assert all(is_valid(v) and (max_value is None or v <= max_value) for v in values)
    assert len(got) == min(len(eligible), math.ceil(len(scores) * fraction - 1e-9))  # the input's size, no 52,002
    assert len(got) > 0 or not eligible  # rounded up: never 0 rows when some are eligible
    expected = sorted(eligible, key=lambda i: -scores[i])[: len(got)]  # sorted() is stable: ties keep order
    assert list(got["id"]) == expected


def test_top_k_by_k_keep_order_and_errors():
    ds = Dataset.from_dict({"ifd": [0.2, 0.9, 1.3, None, 0.6, 0.9, float("nan"), 0.0]})
    assert list(top_k_by(ds, k=2)["ifd"]) == [0.9, 0.9]
    assert list(top_k_by(ds, k=10)["ifd"]) == [0.9, 0.9, 0.6, 0.2]
    assert list(top_k_by(ds, k=3, keep_order=True)["ifd"]) == [0.9, 0.6, 0.9]
    assert list(top_k_by(ds, max_value=None)["ifd"]) == [1.3, 0.9, 0.9, 0.6, 0.2]
    assert len(top_k_by(ds.select(range(0)), fraction=0.5)) == 0
    big = Dataset.from_dict({"ifd": np.linspace(0.01, 0.99, 1000).tolist()})
    assert len(top_k_by(big, fraction=0.05)) == 50
    assert len(top_k_by(big.select(range(1, 1000)), fraction=0.05)) == 50  # 49.95 rounds up
    assert len(top_k_by(big.select(range(1, 991)), fraction=0.05)) == 50  # 49.5 rounds up
    # A handful of rows: 5 % of 8 is 0.4, rounded up to one row, never a silent empty selection.
    assert list(top_k_by(ds, fraction=0.05)["ifd"]) == [0.9]
    assert list(top_k_by(ds, fraction=0.3)["ifd"]) == [0.9, 0.9, 0.6]  # 2.4 -> 3
    for kwargs in ({"k": 1, "fraction": 0.1}, {"fraction": 0.0}, {"fraction": 1.5}, {"k": -1},
                   {"fraction": float("nan")}):
        with pytest.raises(ValueError):
            top_k_by(ds, **kwargs)
    for kwargs in ({"k": 1.5}, {"k": True}, {"fraction": "0.5"}, {"fraction": True}, {"max_value": "1"}):
        (name,) = kwargs
        with pytest.raises(TypeError, match=f"top_k_by: {name} must be"):
            top_k_by(ds, **kwargs)
    assert len(top_k_by(ds, k=np.int64(1), fraction=None, max_value=np.float32(1.0))) == 1
    with pytest.raises(TypeError, match="ds must be a datasets.Dataset, got DatasetDict"):
        top_k_by(DatasetDict({"train": ds}), fraction=0.5)
    none = top_k_by(concatenate_datasets([ds, ds]), k=0)  # an empty pick stays usable downstream
    assert len(none) == 0 and none.column_names == ["ifd"] and len(none.add_column("x", [])) == 0
    with pytest.raises(ColumnError, match="'ifd_loss'"):
        top_k_by(ds, "ifd_loss", k=1)


def test_predicates_in_filter_plain_and_batched():
    ds = Dataset.from_dict({
        "id": list(range(7)),
        "ifd": [0.5, 1.5, None, 0.0, float("nan"), 0.7, 0.9],
        "rifd": [0.4, 0.6, 0.5, 0.5, 0.5, 1.2, 0.3],
        "score_status": ["ok"] * 6 + ["empty_output"],
    })
    for batched in (False, True):
        assert list(ds.filter(ifd_below(), batched=batched)["id"]) == [0, 5]
        assert list(ds.filter(ifd_below(0.6), batched=batched)["id"]) == [0]
        assert list(ds.filter(rifd_below(), batched=batched)["id"]) == [0, 1, 2, 3, 4]
        assert list(ds.filter(is_scored(), batched=batched)["id"]) == [0, 1, 5]
    assert Hasher.hash(ifd_below(1.0)) == Hasher.hash(ifd_below(1.0)) != Hasher.hash(ifd_below(0.9))
    with pytest.raises(ColumnError, match="'rifd_loss'"):
        ds.filter(rifd_below(column="rifd_loss"))
    with pytest.raises(ColumnError, match="must be numeric"):
        Dataset.from_dict({"ifd": ["0.5"]}).filter(ifd_below())


def test_bench_script_agrees_with_per_row_loop():
    import runpy

    bench = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "bench_select.py"))
    result = bench["main"](["--rows", "400", "--loop-rows", "400", "--missing", "0.1"])
    assert result["agree"] and result["selected"] > 0


def test_a_0_row_dataset_scored_with_map_scores_has_the_score_columns_and_selects_nothing():
    """`map` on 0 rows does not call the scorer, so the score columns were missing and `select_v2`
    raised a ColumnError naming them. `map_scores` (the score job's map too) gives 0-row splits
    the typed columns; a plain `map` now gets an error saying why and what to call."""
    from reflectune_hf import IFDScorer, SelectITScorer, map_scores
    from reflectune_hf.cli.configs import StudentConfig
    from reflectune_hf.cli.jobs import score
    from reflectune_hf.reflection.stages import NoOracle, map_stage
    from reflectune_hf.reflection.variants import build_variants

    variants = build_variants(Dataset.from_dict({"instruction": [], "output": []}), NoOracle())
    scorer = IFDScorer(max_length=64)
    scored = map_scores(variants, scorer)
    assert all(s.num_rows == 0 and s.features["ifd"] == Value("float64") for s in scored.values())
    assert scored["origin"].features["score_status"] == Value("string") and scorer._model is None
    chosen = select_v2(scored)
    assert chosen.num_rows == 0 and {"source", "ifd", "rifd", "score_status"} <= set(chosen.column_names)
    assert len(top_k_by(chosen, "ifd", fraction=0.5)) == 0 and len(explain_v2(scored)) == 0
    assert set(score(StudentConfig(), variants)["origin"].column_names) >= set(IFDScorer.output_features)
    assert map_stage(variants["origin"], scorer).features["rifd"] == Value("float64")
    from reflectune_hf.cli.score_job import _score_split  # scripts/score.py: nothing to shard or gather

    assert _score_split(variants["origin"], scorer, None, None).features["ifd"] == Value("float64")
    with pytest.raises(ColumnError, match="has 0 rows and no 'ifd'/'rifd' columns.*map_scores"):
        select_v2(variants.map(scorer, batched=True))
    selectit = map_scores(Dataset.from_dict({"instruction": [], "output": []}), SelectITScorer(k=1))
    assert str(selectit.features["selectit_sentence_by_model"].feature) == "Value('float64')"
    assert len(top_k_by(selectit, "selectit_model")) == 0


def test_selectit_scores_answer_to_selectit_status_not_to_the_ifd_status():
    # Data scored by IFDScorer and SelectITScorer: a row whose IFD failed keeps its SelectIT score,
    # and a SelectIT score whose own status is not ok is not selected (the IFD status was read).
    ds = Dataset.from_dict({"id": [0, 1, 2], "selectit_model": [3.0, 2.0, 1.0], "ifd": [0.5, float("nan"), 0.6],
                            "score_status": ["ok", "no_scored_token:ins_condition", "ok"],
                            "selectit_status": ["error:m2:RuntimeError: x", "ok", "ok"]})
    assert list(top_k_by(ds, "selectit_model", max_value=None)["id"]) == [1, 2]
    assert list(ds.filter(is_scored(["selectit_model"]))["id"]) == [1, 2]
    assert list(ds.filter(is_scored(["selectit_model"]), batched=True)["id"]) == [1, 2]
    assert list(top_k_by(ds, "ifd")["id"]) == [2, 0]


def test_a_source_column_of_the_users_is_refused_not_replaced(variants):
    """The data's own `source` column (e.g. the dataset a row came from) was silently replaced by
    the variant name in the selection; a saved folder's all-null padding is still dropped."""
    theirs = DatasetDict({s: ds.add_column("source", ["dolly"] * len(ds)) for s, ds in variants.items()})
    for select in (select_v1, select_v2):
        with pytest.raises(ColumnError, match="'source' column of its own.*rename_column"):
            select(theirs)
    padded = DatasetDict({s: ds.add_column("source", [None] * len(ds), feature=Value("string"))
                          for s, ds in variants.items()})
    assert set(select_v1(padded)["source"]) == {"reflect_both"}
