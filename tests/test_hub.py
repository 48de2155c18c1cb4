"""Publishing: push_to_hub (Hub calls patched and asserted), save_local, the card offline."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from huggingface_hub import DatasetCard, HfApi

from reflectune_hf import load_sample
from reflectune_hf.data import ColumnError
from reflectune_hf.publishing.card import build_card
from reflectune_hf.publishing.hub import host_only, push_to_hub, sanitize_config, sanitize_context, save_local

from synthetic_variants import make_variants

SECRET = "sk-test-5f1c0ffee-never-publish"
CONTEXT = {
    "oracle_model": "gpt-4o-mini",
    "oracle_base_url": f"https://user:{SECRET}@api.example.com/v1?key={SECRET}",
    "api_key": SECRET,
    "hf_token": SECRET,
    "student_model": "smollm2-135m-instruct",
    "template": "vicuna",
    "prompt_set": "paper",
    "require_below_one": True,
    "source_dataset": "tatsu-lab/alpaca",
    "license": "cc-by-nc-4.0",
}


@pytest.fixture(scope="module")
def variants():
    return make_variants(load_sample())


class Recorder:
    def __init__(self):
        self.calls = []
        self.public = set()  # dataset repos that exist, public


@pytest.fixture
def hub_calls(monkeypatch):
    """Patch every network call of publishing; record what would have been sent."""
    calls = Recorder()

    def data_push(self, repo_id, **kwargs):
        calls.calls.append(("data", repo_id, kwargs, {n: len(ds) for n, ds in dict(self).items()}
                            if isinstance(self, DatasetDict) else {"train": len(self)},
                            list(self.column_names.values())[0] if isinstance(self, DatasetDict) else self.column_names))

    def upload_folder(self, *, folder_path, path_in_repo, repo_id, repo_type, **kwargs):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        pngs_ok = all(Path(folder_path, f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)
        calls.calls.append(("folder", repo_id, {"path_in_repo": path_in_repo, "repo_type": repo_type}, files, pngs_ok))

    def card_push(self, repo_id, **kwargs):
        calls.calls.append(("card", repo_id, kwargs, str(self)))

    monkeypatch.setattr(DatasetDict, "push_to_hub", data_push)
    monkeypatch.setattr(Dataset, "push_to_hub", data_push)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(DatasetCard, "push_to_hub", card_push)
    monkeypatch.setattr(HfApi, "repo_exists", lambda self, repo_id, **kwargs: repo_id in calls.public)
    monkeypatch.setattr(HfApi, "repo_info", lambda self, repo_id, **kwargs: SimpleNamespace(private=False))
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")  # push_to_hub checks for a token before sending anything
    return calls


def test_push_variants(variants, hub_calls):
    url = push_to_hub(variants, "me/recycled", card_context=CONTEXT)
    assert url == "https://huggingface.co/datasets/me/recycled"
    kinds = [c[0] for c in hub_calls.calls]
    assert kinds == ["data", "folder", "card"]
    _, repo, kwargs, rows, columns = hub_calls.calls[0]
    assert repo == "me/recycled" and kwargs["private"] is True
    assert rows == {n: 40 for n in ("origin", "reflect_instruction", "reflect_response", "reflect_both")}
    assert "messages" in columns and "ifd" in columns
    _, repo, where, files, pngs_ok = hub_calls.calls[1]
    assert where == {"path_in_repo": "plots", "repo_type": "dataset"} and pngs_ok
    assert {"ifd_hist.png", "rifd_hist.png", "lengths.png", "selection_funnel.png"} <= set(files)
    _, repo, kwargs, readme = hub_calls.calls[2]
    assert kwargs["repo_type"] == "dataset"
    for expected in ("gpt-4o-mini", "api.example.com", "smollm2-135m-instruct", "vicuna", "paper",
                     "tatsu-lab/alpaca", "cc-by-nc-4.0", "plots/ifd_hist.png", "reflect_both", "Selective"):
        assert expected in readme, expected
    assert SECRET not in readme and "user:" not in readme


def test_push_single_dataset_public(hub_calls):
    push_to_hub(load_sample(), "me/plain", private=False, token="hf_dummy")
    _, repo, kwargs, rows, _ = hub_calls.calls[0]
    assert kwargs["private"] is False and kwargs["token"] == "hf_dummy" and rows == {"train": 40}
    assert "hf_dummy" not in hub_calls.calls[2][3]


def test_push_keeps_untrainable_rows_with_null_messages(hub_calls, caplog):
    """A row with an empty output is published (no row is dropped) with `messages` null and a
    warning that says to drop it before training; a non-string text column raises before sending."""
    bad = Dataset.from_dict({"id": [0, 1], "instruction": ["a", "b"], "input": ["", ""], "output": ["x", ""]})
    with caplog.at_level("WARNING", logger="reflectune_hf.publishing.hub"):
        push_to_hub(bad, "me/bad")
    assert hub_calls.calls[0][3] == {"train": 2} and "1 of 2 rows have an empty instruction or output" in caplog.text
    typed = Dataset.from_dict({"id": [0], "instruction": ["a"], "input": [""], "output": [3]})
    with pytest.raises(ColumnError, match="non-string output"):
        push_to_hub(typed, "me/typed")
    assert len(hub_calls.calls) == 3, "nothing more was sent"


def test_empty_split_is_saved_and_left_out_of_the_data_files(variants, tmp_path, hub_calls):
    """A selection that kept nothing: `save_local` still writes and reloads it (datasets writes no
    shard for an empty split by itself), the parquet files and the card's configs leave it out
    (`load_dataset` cannot read a split without rows), and the card still counts it."""
    data = DatasetDict({**variants, "selected": variants["reflect_both"].select([])})
    out = save_local(data, tmp_path / "out")
    reloaded = load_from_disk(str(out / "arrow"))
    assert len(reloaded["selected"]) == 0 and reloaded["selected"].column_names == reloaded["origin"].column_names
    assert set(load_dataset(str(out))) == set(variants)
    readme = (out / "README.md").read_text()
    assert "| `selected` | the pairs the selection kept" in readme and "The four variant splits" in readme
    push_to_hub(data, "me/none-selected")
    assert set(hub_calls.calls[0][3]) == set(variants)
    with pytest.raises(ValueError, match="every split"):
        save_local(DatasetDict({"selected": data["selected"]}), tmp_path / "nothing")


def test_quality_report_feeds_the_card(tmp_path):
    """`quality_report` (real MiniLM coherence, token lengths) becomes the card's data-quality table."""
    from reflectune_hf.evaluation.quality import quality_report

    data = load_sample().select(range(8))
    quality = quality_report(data, coherence=True)
    out = save_local(data, tmp_path / "q", quality=quality)
    readme = (out / "README.md").read_text()
    assert "### Data quality" in readme and "all-MiniLM-L6-v2" in readme
    row = next(line for line in readme.splitlines() if line.startswith("| `data` | 8 |"))  # report's split name
    cells = [c.strip() for c in row.split("|")[1:-1]]
    entry = quality["splits"]["data"]
    assert float(cells[5]) == pytest.approx(entry["coherence"]["mean"], abs=1e-3)
    assert cells[2] == f"{entry['lengths']['instruction']['mean']:.4g} / {entry['lengths']['instruction']['median']:.4g}"
    assert cells[4] == "– / –", "no perplexity without scores or a student"
    assert json.loads((out / "quality.json").read_text()) == quality


def test_save_local_reloads_and_card_parses(variants, tmp_path):
    out = save_local(variants, tmp_path / "out", card_context=CONTEXT)
    reloaded = load_from_disk(str(out / "arrow"))
    assert isinstance(reloaded, DatasetDict) and reloaded["reflect_both"]["id"] == variants["reflect_both"]["id"]
    files = {name: str(out / "data" / f"{name}-*.parquet") for name in variants}
    parquet = load_dataset("parquet", data_files=files)
    assert set(parquet) == set(variants) and len(parquet["origin"]) == 40
    via_card = load_dataset(str(out))  # the README's `configs` declare the splits
    assert set(via_card) == set(variants)
    card = DatasetCard.load(str(out / "README.md"))
    assert card.data.license == "cc-by-nc-4.0" and "reflection-tuning" in card.data.tags
    assert card.data.source_datasets == ["tatsu-lab/alpaca"]
    for png in ("ifd_hist.png", "selection_funnel.png"):
        assert (out / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_save_local_single_dataset(tmp_path):
    out = save_local(load_sample(), tmp_path / "one")
    assert len(load_from_disk(str(out / "arrow"))) == 40
    assert len(load_dataset(str(out), split="train")) == 40


def test_sanitize_and_host_only():
    assert host_only("http://127.0.0.1:8000/v1") == "127.0.0.1:8000"
    assert host_only("api.openai.com") == "api.openai.com"
    clean = sanitize_context({"nested": {"token": "x", "url": "https://a:b@h/p"}, "OPENAI_API_KEY": "k", "n": 3})
    assert clean == {"nested": {"url": "https://h/p"}, "n": 3}


def test_secrets_are_matched_by_name_precisely_and_urls_keep_their_path():
    config = {"max_new_tokens": 64, "tokens_per_minute": 9000.0, "max_tokens_per_batch": 4096, "tokenizer": "t",
              "base_url": f"http://me:{SECRET}@127.0.0.1:8000/v1?api_key={SECRET}&region=eu",
              "api_key": SECRET, "openai_key": SECRET, "hf_token": SECRET, "token": SECRET, "bearer": SECRET,
              "password": SECRET, "client_secret": SECRET, "Authorization": SECRET}
    clean = sanitize_config(config)
    assert clean == {"max_new_tokens": 64, "tokens_per_minute": 9000.0, "max_tokens_per_batch": 4096,
                     "tokenizer": "t", "base_url": "http://127.0.0.1:8000/v1?region=eu"}
    assert sanitize_context(config) == clean


def test_secrets_and_paths_inside_lists_never_reach_a_card_or_config(tmp_path):
    """Lists are cleaned like mappings: a list of servers or of data files keeps no credential,
    secret query parameter or local path."""
    local = tmp_path / "private-folder" / "part-1.jsonl"
    local.parent.mkdir()
    local.write_text("{}")
    context = {"oracles": [{"model": "m", "base_url": f"http://me:{SECRET}@127.0.0.1:8000/v1", "api_key": SECRET},
                           f"https://u:{SECRET}@h.example.com/v1?key={SECRET}"],
               "data_files": [str(local), "tatsu-lab/alpaca"], "tags": ["a", "b"]}
    clean = sanitize_config(context)
    assert SECRET not in json.dumps(clean) and clean["data_files"] == [str(local), "tatsu-lab/alpaca"]
    assert clean["oracles"] == [{"model": "m", "base_url": "http://127.0.0.1:8000/v1"}, "https://h.example.com/v1"]
    public = sanitize_context(context)
    assert public["data_files"] == ["part-1.jsonl (local file)", "tatsu-lab/alpaca"] and public["tags"] == ["a", "b"]
    card = str(build_card(load_sample(), context))
    assert SECRET not in card and str(tmp_path) not in card


def test_configuration_values_stay_in_their_table_cell():
    """A value with a pipe or line breaks (a system prompt, a model name) cannot end the table
    or add a heading to the card."""
    context = {"system_prompt": "Be brief.\n\n## Injected heading\nmore", "oracle_model": "org/m|v2"}
    card = str(build_card(load_sample(), context))
    assert "\n## Injected heading" not in card
    rows = [line for line in card.splitlines() if line.startswith(("| system_prompt", "| oracle_model"))]
    assert rows == ["| system_prompt | Be brief.<br><br>## Injected heading<br>more |", "| oracle_model | org/m\\|v2 |"]


def test_local_paths_never_reach_the_card(tmp_path):
    rows = tmp_path / "private-folder" / "my-rows.jsonl"
    rows.parent.mkdir()
    rows.write_text("{}")
    context = {"source_dataset": str(rows), "student_model": str(tmp_path / "private-folder"),
               "oracle_model": f"local:{tmp_path}/private-folder/", "template": "vicuna"}
    clean = sanitize_context(context)
    assert clean == {"source_dataset": "my-rows.jsonl (local file)", "student_model": "private-folder",
                     "oracle_model": "local:private-folder", "template": "vicuna"}
    card = str(build_card(load_sample(), context))
    assert str(tmp_path) not in card and "my-rows.jsonl (local file)" in card
    assert "source_datasets" not in card, "only a Hub id goes into the metadata"


def test_a_free_text_license_is_other_in_the_metadata_and_named_on_one_line():
    """A loaded dataset's `info.license` is often free text: it went into the card's YAML
    `license` (not a Hub license id) and broke the body's inline code over several lines."""
    from huggingface_hub import DatasetCard

    text = "Creative Commons Attribution 4.0\nSee https://example.org/LICENSE"
    card = DatasetCard(str(build_card(load_sample(), {"license": text})))
    assert card.data.license == "other"
    assert "license of its source: `Creative Commons Attribution 4.0 See https://example.org/LICENSE`." in card.text
    assert DatasetCard(str(build_card(load_sample(), {"license": "cc-by-4.0"}))).data.license == "cc-by-4.0"


def test_push_without_a_token_says_how_to_log_in_and_sends_nothing(hub_calls, monkeypatch, tmp_path):
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "stored_tokens"))
    with pytest.raises(PermissionError, match=r"No Hugging Face token.*hf auth login.*HF_TOKEN"):
        push_to_hub(load_sample(), "me/data")
    assert hub_calls.calls == []
    push_to_hub(load_sample(), "me/data", token="hf_given")  # a token passed in is enough
    assert hub_calls.calls[0][2]["token"] == "hf_given"


def test_a_card_context_that_is_not_a_mapping_is_one_clear_error(hub_calls):
    """build_card(ds, "me/data") (the repo id where the settings go) died deep in sanitize_config
    with "'str' object has no attribute 'items'"."""
    with pytest.raises(TypeError, match="mapping of settings.*got a str: pass a Hub id as repo_id="):
        build_card(load_sample().select(range(2)), "me/data")
    with pytest.raises(TypeError, match="mapping of settings"):
        push_to_hub(load_sample().select(range(2)), "me/data", card_context="me/data", token="hf_x")
    assert not hub_calls.calls


def test_card_of_unscored_data_has_no_score_section():
    card = str(build_card(load_sample()))
    assert "### Scores" not in card and "| `train` | 40 |" in card


def test_card_of_data_no_oracle_rewrote_does_not_say_it_was_recycled():
    """`reflectune score` on plain pairs: the card said an oracle had rewritten them."""
    scored = load_sample().select(range(2)).add_column("ifd", [0.5, 0.7])
    card = str(build_card(scored, {"source_dataset": "my.jsonl (local file)"}))
    assert "were recycled with" not in card and "oracle LLM" not in card and "*_raw" not in card
    assert "were scored by a student model" in card
    assert "no oracle" in str(build_card(load_sample()))
    reflected = str(build_card(make_variants(load_sample().select(range(4)))))
    assert "were recycled with **Reflection-Tuning**" in reflected and "*_raw" in reflected
    # Nor is it titled or tagged as recycled data.
    variants = make_variants(load_sample().select(range(4)))
    titles = [build_card(d).data.pretty_name for d in (scored, load_sample(), variants)]
    assert titles == ["IFD-scored instruction data", "Instruction data", "Reflection-Tuning recycled data"]
    assert not {"data-recycling", "reflection-tuning"} & set(build_card(scored).data.tags)
    assert {"data-recycling", "reflection-tuning"} <= set(build_card(variants).data.tags)


def test_a_second_write_removes_what_only_the_first_wrote_and_nothing_else(tmp_path):
    """Splits then one Dataset into the same folder: the first write's `quality.json`, split folders,
    `dataset_dict.json` (which would reload the old splits) and split parquet files go; a file of
    the user's, and names a manifest lists that this layout never writes, stay."""
    from reflectune_hf.evaluation.quality import quality_report
    from reflectune_hf.publishing.outputs import MANIFEST, read_manifest

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    small = make_variants(load_sample().select(range(6)))
    save_local(small, out, quality=quality_report(small, coherence=False), run_record={"selection": "v2"})
    assert {"quality.json", "reflectune_config.json", "arrow/origin/state.json"} <= set(read_manifest(out))
    (out / "data" / "mine.parquet").write_bytes(b"user")  # not listed: never removed
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({"files": [*manifest["files"], "notes.txt", "../outside.json"]}))
    (tmp_path / "outside.json").write_text("{}")

    save_local(load_sample().select(range(3)), out)
    assert len(load_from_disk(str(out / "arrow"))) == 3, "the stale dataset_dict.json is gone"
    assert not (out / "quality.json").exists() and not (out / "reflectune_config.json").exists()
    assert not (out / "arrow" / "origin").exists() and not list((out / "data").glob("origin-*"))
    assert (out / "notes.txt").read_text() == "mine" and (tmp_path / "outside.json").is_file()
    assert (out / "data" / "mine.parquet").read_bytes() == b"user"
    assert "quality.json" not in read_manifest(out) and "data/train-00000-of-00001.parquet" in read_manifest(out)

    save_local(small, out)  # splits again over one Dataset: its arrow/state.json is not this write's
    assert len(load_from_disk(str(out / "arrow"))["origin"]) == 6, "the stale state.json is gone"
    assert "arrow/state.json" not in read_manifest(out) and "arrow/origin/state.json" in read_manifest(out)


def test_saved_summary_and_card_count_v2_with_the_run_rule(tmp_path, variants):
    """A run with --ratio loss --require_below_one false: the summary's and card's V2 counts are
    those of that rule (the `selected` split the run wrote), not of the defaults (ppl, below one)."""
    from reflectune_hf.selection.select import select_v2

    chosen = select_v2(variants, require_below_one=False, ratio="loss")
    default = select_v2(variants)
    assert len(chosen) != len(default)
    data = DatasetDict({**variants, "selected": chosen})
    out = save_local(data, tmp_path / "out", card_context={"ratio": "loss", "require_below_one": False})
    v2 = json.loads((out / "summary.json").read_text())["selection"]["v2"]
    assert (v2["ratio"], v2["require_below_one"], v2["selected"]) == ("loss", False, len(chosen))
    assert f"| V2 (selective, ratio=loss, require_below_one=False) | {len(chosen)} |" in (out / "README.md").read_text()


@pytest.mark.parametrize("name", ["README.md", "data/train-00000-of-00001.parquet"])
def test_save_local_never_replaces_a_file_of_the_users(tmp_path, name):
    """A folder holding the user's README.md (or a parquet file at a name the layout uses) that no
    manifest lists: refused before anything is written, the file kept as it was."""
    out = tmp_path / "out"
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    (out / name).write_text("the user's own")
    with pytest.raises(FileExistsError, match=name):
        save_local(load_sample().select(range(3)), out)
    assert (out / name).read_text() == "the user's own" and not (out / "arrow").exists()
    save_local(load_sample().select(range(3)), tmp_path / "ours")
    save_local(load_sample().select(range(2)), tmp_path / "ours")  # our own files: written again
    assert len(load_from_disk(str(tmp_path / "ours" / "arrow"))) == 2
    (tmp_path / "ours" / "reflectune_files.json").unlink()  # no manifest, no run record: nothing says they are ours
    with pytest.raises(FileExistsError):
        save_local(load_sample().select(range(1)), tmp_path / "ours")
    save_local(load_sample().select(range(1)), tmp_path / "old", run_record={"data": "sample"})
    (tmp_path / "old" / "reflectune_files.json").unlink()  # an earlier version's output: our config, no manifest
    save_local(load_sample().select(range(3)), tmp_path / "old")
    assert len(load_from_disk(str(tmp_path / "old" / "arrow"))) == 3


def test_a_single_scored_dataset_has_one_split_name_in_card_and_summary(tmp_path, variants):
    """One Dataset is published as the split `train`: the card's score table and summary.json name
    that split too (they said `data`, a split the folder and the card's split table do not have)."""
    out = save_local(variants["reflect_response"], tmp_path / "out")
    assert list(json.loads((out / "summary.json").read_text())["splits"]) == ["train"]
    readme = (out / "README.md").read_text()
    assert "| `train` | IFD |" in readme and "| `data` |" not in readme
    assert set(load_dataset(str(out))) == {"train"}


def test_status_table_of_a_split_without_rows_says_so(variants):
    """A selection that kept nothing: its status cells say `no rows`, not an empty cell."""
    card = str(build_card(DatasetDict({**variants, "selected": variants["reflect_both"].select([])})))
    assert "| `selected` | `reflection_status` | no rows |" in card
    assert not [line for line in card.splitlines() if line.endswith("|  |")]


def test_status_table_counts_null_and_empty_statuses_once():
    """Statuses None and "" both mean no status: one `(none)` count, not two."""
    ds = Dataset.from_dict({"instruction": list("abcd"), "output": list("wxyz"),
                            "reflection_status": ["ok", None, "", "ok"]})
    assert "| `train` | `reflection_status` | ok: 2, (none): 2 |" in str(build_card(ds))


def test_quality_table_says_how_many_rows_a_perplexity_or_ifd_covers(variants):
    """Unscored rows are left out of the quality table's perplexity and IFD: the cells say how many
    rows they cover (they showed a mean over fewer rows than the row count beside it)."""
    from reflectune_hf.evaluation.quality import quality_report

    data = DatasetDict({"reflect_response": variants["reflect_response"]})
    quality = quality_report(data, tokenizer=_whitespace_tokenizer(), coherence=False)
    entry = quality["splits"]["reflect_response"]
    n, rows = entry["perplexity"]["columns"]["ppl_out_condition"]["count"], entry["rows"]
    assert 0 < n < rows and entry["ifd"]["count"] == n
    row = next(line for line in str(build_card(data, quality=quality)).splitlines()
               if line.startswith("| `reflect_response` | 40 |") and line.count("|") == 8)  # the quality row
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[4].endswith(f" ({n} of {rows} rows)") and cells[6].endswith(f" ({n} of {rows} rows)")
    assert cells[5] == "–" and "of" not in cells[2]


def _whitespace_tokenizer():
    class Tokenizer:
        name_or_path = "whitespace"

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [t.split() for t in texts]}
    return Tokenizer()


def test_a_column_all_null_in_the_first_split_takes_the_type_of_another(tmp_path):
    """A column with no value in the first split is typed null there: the other splits were cast to
    null and the write failed deep in datasets (`Couldn't cast array of type double to null`)."""
    first = Dataset.from_dict({"instruction": ["a", "b"], "output": ["x", "y"], "ifd": [None, None]})
    second = Dataset.from_dict({"instruction": ["c"], "output": ["z"], "ifd": [0.5]})
    out = save_local(DatasetDict({"origin": first, "selected": second}), tmp_path / "out")
    reloaded = load_from_disk(str(out / "arrow"))
    assert reloaded["selected"]["ifd"] == [0.5] and reloaded["origin"]["ifd"] == [None, None]


def test_an_existing_public_repo_is_not_pushed_to_as_if_private(hub_calls):
    """`private` (the default) only applies to a repo the push creates: pushing to an existing public
    repo published the data, silently. It is refused before anything is sent, unless private=False."""
    hub_calls.public.add("me/public")
    with pytest.raises(PermissionError, match=r"me/public exists and is public.*private=False \(--no_private\)"):
        push_to_hub(load_sample(), "me/public")
    assert hub_calls.calls == []
    push_to_hub(load_sample(), "me/public", private=False)
    assert [c[0] for c in hub_calls.calls] == ["data", "folder", "card"]
