"""build_variants: four aligned splits with one schema, statuses for every row, datasets' cache.

The oracle is the scripted test double (tests/scripted_oracle.py); tests/test_variants_server.py
runs the same function against the real llama.cpp server.
"""

from __future__ import annotations

import pytest
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from reflectune_hf.reflection.extract import STATUSES
from reflectune_hf.reflection.variants import VARIANT_SPLITS, build_variants

from scripted_oracle import GOOD_COMPRESS, GOOD_INSTRUCTION, GOOD_RESPONSE, ScriptedOracle

INSTRUCTION_SYSTEM = "quality of a given instruction."


def _oracle() -> ScriptedOracle:
    # Row "BAD-INS" gets no usable instruction reflection; row "ERR-RES" an oracle error on
    # response reflection; the compressed row "Sort" keeps its text via the compression answer.
    return ScriptedOracle(rules=(
        ("careful editor", (GOOD_COMPRESS.format(topic="Sort 3, 1, 2"),)),
        (INSTRUCTION_SYSTEM + "\n[Instruction]\nBAD-INS", ("I refuse to follow formats.",)),
        (INSTRUCTION_SYSTEM, (GOOD_INSTRUCTION.format(topic="stars"),)),
        ("[Instruction]\nERR-RES", ("!error APITimeoutError: timed out",)),
        ("quality of the answer", (GOOD_RESPONSE.format(topic="the pair"),)),
    ))


@pytest.fixture
def arrow_ds(tmp_path):
    rows = {
        "instruction": ["Name a star.", "BAD-INS tell a joke", "ERR-RES add", "Sort"],
        "input": ["", "", "", "3, 1, 2"],
        "output": ["Sun", "No.", "5", "1, 2, 3"],
    }
    Dataset.from_dict(rows).save_to_disk(tmp_path / "rows")
    return load_from_disk(str(tmp_path / "rows"))


def test_four_aligned_splits_with_one_schema_and_statuses(arrow_ds, tmp_path):
    oracle = _oracle()
    variants = build_variants(arrow_ds, oracle, batch_size=3)
    assert isinstance(variants, DatasetDict) and tuple(variants) == VARIANT_SPLITS
    assert {len(variants[s]) for s in VARIANT_SPLITS} == {4}
    assert all(list(variants[s]["id"]) == [0, 1, 2, 3] for s in VARIANT_SPLITS)
    assert len({str(variants[s].features) for s in VARIANT_SPLITS}) == 1

    origin, ri, rr, rb = (variants[s] for s in VARIANT_SPLITS)
    assert list(origin["compress_status"]) == ["no_input", "no_input", "no_input", "ok"]
    assert origin[3]["instruction"] == "Sort 3, 1, 2, using the given input." and origin[3]["input"] == ""
    assert origin[3]["original_input"] == "3, 1, 2"
    assert list(ri["instruction_reflection_status"]) == ["ok", "failed", "ok", "ok"]
    assert ri[0]["instruction"] == "Explain stars in three steps." and ri[0]["output"] == "Step one about stars."
    assert ri[1]["instruction"] == "BAD-INS tell a joke" and ri[1]["output"] == "No."  # fallback keeps the pair
    assert list(rr["response_reflection_status"]) == ["ok", "ok", "oracle_error", "ok"]
    assert rr[2]["output"] == "5" and rr[2]["response_reflection_error"] == "APITimeoutError: timed out"
    assert rr[0]["instruction"] == "Name a star." and rr[0]["output"] == "A detailed answer about the pair."
    # reflect_both: response reflection of the instruction-reflected pair
    assert list(rb["instruction"]) == list(ri["instruction"])
    assert list(rb["instruction_reflection_status"]) == list(ri["instruction_reflection_status"])
    assert list(rb["response_reflection_status"]) == ["ok", "ok", "ok", "ok"]
    # reflection_status: the split's last reflection step (what reflectune_hf.selection.select reads)
    assert list(ri["reflection_status"]) == list(ri["instruction_reflection_status"])
    assert list(rb["reflection_status"]) == list(rb["response_reflection_status"])
    assert list(rr["reflection_status"]) == list(rr["response_reflection_status"])
    assert set(origin["reflection_status"]) == {""}
    # Columns a split did not go through are empty, never missing.
    assert set(origin["instruction_reflection_status"]) == {""} and set(ri["response_reflection_status"]) == {""}
    assert set(rr["instruction_reflection_raw"]) == {""} and set(origin["response_reflection_attempts"]) == {0}
    for split in VARIANT_SPLITS[1:]:
        for prefix in ("instruction", "response"):
            assert set(variants[split][f"{prefix}_reflection_status"]) <= set(STATUSES) | {""}

    # reflect_both asks row 1 (instruction reflection failed) exactly what reflect_response asked:
    # a caching oracle answers it from its cache.
    asked = [r.key("scripted") for r in oracle.requests
             if "[Instruction]\nBAD-INS" in r.message_dicts[1]["content"] and INSTRUCTION_SYSTEM not in r.message_dicts[0]["content"]]
    assert len(asked) == 2 and asked[0] == asked[1]

    # One schema: the splits load back as one configuration.
    files = {}
    for split in VARIANT_SPLITS:
        files[split] = str(tmp_path / f"{split}.parquet")
        variants[split].to_parquet(files[split])
    loaded = load_dataset("parquet", data_files=files)
    assert loaded["reflect_both"].to_list() == rb.to_list()


def test_rerun_is_served_by_the_datasets_cache_except_failed_rows(arrow_ds):
    first = build_variants(arrow_ds, _oracle())
    assert list(first["reflect_response"]["reflection_status"]) == ["ok", "ok", "oracle_error", "ok"]
    again = _oracle()
    variants = build_variants(arrow_ds, again)
    # Only the map whose cached result has a failed row (ERR-RES's response reflection) runs again;
    # this scripted oracle has no cache, so it is asked its 4 rows (a caching oracle sends only
    # the failed one: tests/test_rerun.py).
    assert len(again.requests) == 4 and len(variants["reflect_both"]) == 4
    assert all("quality of the answer" in r.message_dicts[0]["content"] for r in again.requests)
    assert "ERR-RES add" in again.requests[2].message_dicts[1]["content"]


def test_without_compression_inputs_are_kept_or_merged_never_dropped(arrow_ds):
    oracle = _oracle()
    variants = build_variants(arrow_ds, oracle, compress=False)
    assert variants["origin"][3]["input"] == "3, 1, 2" and "compress_status" not in variants["origin"].column_names
    assert variants["reflect_response"][3]["input"] == "3, 1, 2"
    with_input = [r for r in oracle.requests if "[The Start of Input]\n3, 1, 2" in r.message_dicts[1]["content"]]
    assert len(with_input) == 1  # the response reflection of the origin row, with the input prompt
    assert any("Sort\n\n3, 1, 2" in r.message_dicts[1]["content"] for r in oracle.requests)  # merged
    assert variants["reflect_instruction"][3]["input"] == ""


@pytest.mark.parametrize("compress", [True, False])
def test_zero_rows_give_four_empty_splits_with_the_full_schema(arrow_ds, compress):
    full = build_variants(arrow_ds, _oracle(), compress=compress)
    oracle = _oracle()
    # an Arrow-backed selection, and an in-memory dataset whose columns have Arrow's null type
    for empty in (arrow_ds.select([]), Dataset.from_dict({"instruction": [], "input": [], "output": []})):
        variants = build_variants(empty, oracle, compress=compress)
        assert isinstance(variants, DatasetDict) and tuple(variants) == VARIANT_SPLITS
        for split in VARIANT_SPLITS:
            assert len(variants[split]) == 0 and variants[split].column_names == full[split].column_names
            assert variants[split].features == full[split].features
            assert len(variants[split].add_column("ifd", [])) == 0  # a clean table, no stale indices
    assert oracle.requests is None  # no oracle call


def test_bad_input_is_rejected_clearly():
    with pytest.raises(TypeError, match="pick a split"):
        build_variants(DatasetDict({"train": Dataset.from_dict({"instruction": ["a"], "output": ["b"]})}), _oracle())
    with pytest.raises(ValueError, match=r"needs the column\(s\) \['output'\]"):
        build_variants(Dataset.from_dict({"instruction": ["a"]}), _oracle())


def test_variants_feed_v2_selection_which_reads_the_statuses(arrow_ds):
    from reflectune_hf.selection.select import explain_v2, select_v2

    variants = build_variants(arrow_ds, _oracle())
    ifd = {"origin": [0.5] * 4, "reflect_instruction": [0.6, 0.6, 0.4, 0.6],
           "reflect_response": [0.5] * 4, "reflect_both": [0.5] * 4}
    rifd = {"origin": [0.9] * 4, "reflect_instruction": [0.9] * 4, "reflect_response": [0.5] * 4, "reflect_both": [0.5] * 4}
    scored = DatasetDict({s: variants[s].add_column("ifd", ifd[s]).add_column("rifd", rifd[s]) for s in VARIANT_SPLITS})
    # Row 1: instruction reflection failed (Q is the origin) -> its response twin; row 2: Q scored
    # lower, and its response reflection hit an oracle error -> not reflected, not selected.
    assert list(explain_v2(scored)["v2_outcome"]) == ["reflect_both", "reflect_response", "not_reflected", "reflect_both"]
    assert list(select_v2(scored)["id"]) == [0, 1, 3]


def test_rows_sent_nothing_are_format_outcome_none_not_fallback():
    """A row that gets no request (blank output, text that is not UTF-8) was counted as a format
    `fallback` ("never parsed in full"), as if the oracle had answered off-format: the measured
    format rate of the card and the closing table blamed the oracle for rows it never saw."""
    from reflectune_hf.oracles.stage_formats import format_outcome

    data = Dataset.from_dict({"instruction": ["Name a star.", "Name a bird."], "output": ["Sun", "  "]})
    variants = build_variants(data, _oracle(), compress=False)
    for split in VARIANT_SPLITS[1:]:
        assert list(variants[split]["reflection_status"]) == ["ok", "empty_input"]
        assert list(variants[split]["format_outcome"]) == ["first_try", "none"]
    assert format_outcome("invalid_text", 0) == "none"  # Arrow cannot hold such text: only a batch has it


def test_data_with_the_columns_build_variants_writes_is_refused_before_any_oracle_call(arrow_ds):
    """Recycling an earlier run's split (its reflection columns) failed with pyarrow's `KeyError:
    Field "instruction_reflection_status" exists 2 times in schema`, after compression and
    instruction reflection had been paid for."""
    earlier = build_variants(arrow_ds, _oracle())["reflect_both"]
    oracle = _oracle()
    with pytest.raises(ValueError, match=r"which build_variants writes .*remove_columns\(\['reflection_status'"):
        build_variants(earlier, oracle)
    assert oracle.requests is None


def test_a_chat_column_beside_the_alpaca_pair_is_refused_before_any_oracle_call():
    """A `messages` column next to `instruction` / `output` was kept unchanged in every split, so
    `prepare_sft_dataset` and the published data trained on the pair before reflection."""
    ds = Dataset.from_dict({"instruction": ["Name a star."], "output": ["Sun"],
                            "messages": [[{"role": "user", "content": "Name a star."},
                                          {"role": "assistant", "content": "Sun"}]]})
    oracle = _oracle()
    with pytest.raises(ValueError, match=r"\['messages'\] beside instruction / output.*remove_columns"):
        build_variants(ds, oracle)
    assert oracle.requests is None


def test_a_source_column_is_refused_before_any_oracle_call():
    """The selection writes `source` (the split a selected row comes from): the data's own
    `source` would be replaced after the oracle and the student had been paid for."""
    oracle = _oracle()
    with pytest.raises(ValueError, match=r"\['source'\], which the selection writes.*rename_column\('source'"):
        build_variants(Dataset.from_dict({"instruction": ["Name a star."], "output": ["Sun"], "source": ["x"]}), oracle)
    assert oracle.requests is None
