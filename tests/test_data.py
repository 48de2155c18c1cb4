"""The data model: the bundled sample, ids, column checks, loaders."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from reflectune_hf.data import (
    ColumnError,
    add_ids,
    load_data,
    load_sample,
    read_records,
    require_columns,
    sample_path,
    text_column,
    to_alpaca,
)


def test_sample_schema_and_counts():
    ds = load_sample()
    assert len(ds) == 40
    assert ds.column_names == ["instruction", "input", "output", "id"]
    assert ds["id"] == list(range(40))
    assert sum(1 for x in ds["input"] if x) == 10
    for row in ds:
        assert row["instruction"].strip() and row["output"].strip()
    assert len(set(ds["instruction"])) == 40


def test_sample_file_is_plain_jsonl():
    rows = [json.loads(line) for line in sample_path().read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 40 and all(set(r) == {"instruction", "input", "output"} for r in rows)


def test_sample_is_arrow_backed_so_map_caches():
    assert load_sample().cache_files, "map results are only cached for Arrow-backed datasets"


def test_add_ids_on_an_iterable_dataset():
    # Issue #16.8: IterableDataset.map takes no `desc`; ids are added lazily, existing ones kept.
    ds = Dataset.from_dict({"instruction": ["a", "b", "c"]}).to_iterable_dataset()
    assert [row["id"] for row in add_ids(ds)] == [0, 1, 2]
    with_ids = Dataset.from_dict({"instruction": ["a", "b"], "id": [7, 9]}).to_iterable_dataset()
    assert [row["id"] for row in add_ids(with_ids)] == [7, 9]


def test_add_ids_keeps_existing_and_rejects_duplicates():
    ds = Dataset.from_dict({"instruction": ["a", "b"], "id": [7, 9]})
    assert add_ids(ds)["id"] == [7, 9]
    with pytest.raises(ColumnError, match="not unique"):
        add_ids(Dataset.from_dict({"instruction": ["a", "b"], "id": [1, 1]}))


def test_require_columns_names_missing_and_present():
    with pytest.raises(ColumnError) as info:
        require_columns(Dataset.from_dict({"instruction": ["x"]}), ["instruction", "output"], "Stage")
    message = str(info.value)
    assert "Stage" in message and "['output']" in message and "['instruction']" in message


def test_text_column_rejects_non_strings():
    assert text_column({"input": [None, "x"]}, "input", "s") == ["", "x"]
    with pytest.raises(ColumnError, match="row 1"):
        text_column({"input": ["x", 3]}, "input", "s")


def test_to_alpaca_fills_missing_input_and_ids():
    ds = to_alpaca(Dataset.from_dict({"instruction": ["a"], "output": ["b"]}))
    assert ds[0] == {"instruction": "a", "output": "b", "input": "", "id": 0}
    ds = to_alpaca(Dataset.from_dict({"instruction": ["a", "c"], "input": [None, "x"], "output": ["b", "d"]}))
    assert ds["input"] == ["", "x"]


def test_to_alpaca_rejects_wrong_types():
    with pytest.raises(ColumnError, match="output"):
        to_alpaca(Dataset.from_dict({"instruction": ["a"], "output": [1]}))
    with pytest.raises(ColumnError, match="missing"):
        to_alpaca(Dataset.from_dict({"instruction": ["a"]}))


def test_load_data_from_files(tmp_path):
    records = [{"instruction": "i", "input": "", "output": "o"}, {"instruction": "j", "input": "k", "output": "p"}]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    Dataset.from_list(records).to_parquet(str(tmp_path / "a.parquet"))
    Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    for name in ("a.json", "a.jsonl", "a.parquet", "saved"):
        ds = load_data(tmp_path / name)
        assert ds["instruction"] == ["i", "j"] and ds["id"] == [0, 1], name
    assert len(load_data("sample")) == 40
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_data(tmp_path / "empty.jsonl")
    (tmp_path / "a.csv").write_text("instruction,output\n")
    with pytest.raises(ValueError, match="Unsupported"):
        load_data(tmp_path / "a.csv")


def test_shared_compressed_rows_load(shared_data):
    ds = load_data(shared_data / "cherry_alpaca_5_percent_compressed.json")
    assert len(ds) == 3111 and set(ds["input"]) == {""}
    assert len(read_records(shared_data / "cherry_alpaca_5_percent.json")) == 3111


# -- TRL formats on load, missing local files ------------------------------------------------------


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_trl_messages_and_prompt_completion_load_as_alpaca(tmp_path):
    """`messages` (system? + user + assistant) and `prompt` / `completion` (strings or message
    lists, TRL's standard and conversational formats) become Alpaca rows on load."""
    def msg(role, content):
        return {"role": role, "content": content}

    messages = _write_jsonl(tmp_path / "messages.jsonl", [
        {"messages": [msg("system", "Be brief."), msg("user", "Name a colour."), msg("assistant", "Blue.")]},
        {"messages": [msg("user", "Add 2 and 2."), msg("assistant", "4")]},
    ])
    ds = load_data(str(messages))
    assert ds.column_names == ["instruction", "input", "output", "system", "id"]
    assert ds[0] == {"instruction": "Name a colour.", "input": "", "output": "Blue.", "system": "Be brief.", "id": 0}
    assert ds[1]["instruction"] == "Add 2 and 2." and ds[1]["system"] == ""
    standard = _write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Say hi.", "completion": "Hi!", "source": "x"}])
    row = load_data(str(standard))[0]
    assert (row["instruction"], row["output"], row["input"], row["source"]) == ("Say hi.", "Hi!", "", "x")
    conversational = _write_jsonl(tmp_path / "conv.jsonl", [
        {"prompt": [msg("system", "S."), msg("user", "Q?")], "completion": [msg("assistant", "A.")]}])
    row = load_data(str(conversational))[0]
    assert (row["instruction"], row["output"], row["system"]) == ("Q?", "A.", "S.")


def test_chat_rows_keep_their_own_system_and_input_columns(tmp_path):
    """A `system` (or `input`) column next to `prompt` / `completion` or `messages` was replaced by ""."""
    path = _write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Say hi.", "completion": "Hi!", "system": "Be warm.",
                                                 "input": "to Ann"}])
    row = load_data(str(path))[0]
    assert (row["instruction"], row["input"], row["output"], row["system"]) == ("Say hi.", "to Ann", "Hi!", "Be warm.")
    turns = [{"role": "system", "content": "From the turn."}, {"role": "user", "content": "Q?"},
             {"role": "assistant", "content": "A."}]
    path = _write_jsonl(tmp_path / "m.jsonl", [{"messages": turns, "system": "From the column."},
                                                {"messages": turns[1:], "system": "From the column."}])
    assert load_data(str(path))["system"] == ["From the turn.", "From the column."]


def test_a_saved_folder_without_the_split_names_its_splits(tmp_path):
    """`load_data(folder)` on a saved DatasetDict without `train` raised a bare KeyError: 'train'."""
    from datasets import Dataset, DatasetDict

    rows = Dataset.from_dict({"instruction": ["Hi"], "input": [""], "output": ["Hello"]})
    DatasetDict({"origin": rows}).save_to_disk(tmp_path / "run")
    with pytest.raises(ValueError, match=r"holds the splits \['origin'\], not 'train': pick one with split="):
        load_data(str(tmp_path / "run"))
    assert load_data(str(tmp_path / "run"), split="origin")["output"] == ["Hello"]


def test_multi_turn_rows_are_refused_naming_the_row(tmp_path):
    def msg(role, content):
        return {"role": role, "content": content}

    path = _write_jsonl(tmp_path / "multi.jsonl", [
        {"messages": [msg("user", "Hi."), msg("assistant", "Hello.")]},
        {"messages": [msg("user", "Hi."), msg("assistant", "Hello."), msg("user", "And?"), msg("assistant", "Bye.")]},
    ])
    with pytest.raises(ColumnError, match=r"row 1 is not a single-turn conversation .*split or drop multi-turn"):
        load_data(str(path))


def test_a_missing_local_file_is_reported_as_missing_not_looked_up_on_the_hub(tmp_path):
    for name in (str(tmp_path / "nope.jsonl"), "./nope.parquet", "data/sub/nope"):
        with pytest.raises(FileNotFoundError, match="no such file or directory") as err:
            load_data(name)
        assert "Hub" not in str(err.value).split("(")[0] and name in str(err.value)


def test_read_records_is_the_one_json_reader_and_names_bad_files(tmp_path):
    """`read_records` (also what `load_eval_set` and `reflectune eval --responses_a` read with)
    refuses a file without rows, a non-object row and text that is not JSON, naming the file."""
    from reflectune_hf.data import read_records

    cases = {"empty.jsonl": ("\n", "holds no rows"), "list.json": ("[1, 2]", "row 0 is a int"),
             "broken.jsonl": ('{"a": 1}\n{"a": \n', "is not JSON or JSON lines")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message) as err:
            read_records(tmp_path / name)
        assert name in str(err.value)
    (tmp_path / "ok.json").write_text('  [{"instruction": "Hi"}]')
    assert read_records(tmp_path / "ok.json") == [{"instruction": "Hi"}]


def test_records_to_dataset_keeps_keys_that_the_first_record_lacks():
    """An `input` (or any key) absent from the first record was dropped: Dataset.from_list reads
    the first row's keys only, so the second row's input was lost without a word."""
    from reflectune_hf.data import records_to_dataset

    ds = records_to_dataset([{"instruction": "Say hi.", "output": "Hi"},
                             {"instruction": "Translate.", "input": "Good morning", "output": "Bonjour", "src": "x"}])
    assert ds["input"] == ["", "Good morning"] and ds["src"] == [None, "x"] and ds["id"] == [0, 1]


def test_add_ids_refuses_missing_ids_and_says_what_to_do():
    """NaN ids passed the uniqueness check (NaN != NaN) and build_variants then died after every
    oracle call with "split 'reflect_instruction' is not aligned with 'origin' by id"; None ids
    passed into every split; two Nones were called "not unique"."""
    for ids in ([0.0, float("nan"), float("nan")], [1, None, 2], [3, None, None]):
        with pytest.raises(ColumnError, match=r"missing values \(None or NaN\) at row\(s\) \[1.*remove_columns"):
            add_ids(Dataset.from_dict({"instruction": ["a", "b", "c"], "id": ids}))
    with pytest.raises(ColumnError, match=r"not unique: \[1\] repeat.*remove_columns\('id'\)"):
        add_ids(Dataset.from_dict({"instruction": ["a", "b", "c"], "id": [1, 1, 2]}))
