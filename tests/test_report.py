"""Statistics and plots: summarize (JSON for the dataset card) and plot_summary (PNGs)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from datasets import Dataset, DatasetDict
from matplotlib.image import imread
from synthetic_variants import is_valid, make_variants

from reflectune_hf import load_sample
from reflectune_hf.publishing.report import plot_summary, summarize
from reflectune_hf.selection.select import VARIANT_SPLITS, select_v2


@pytest.fixture(scope="module")
def variants():
    return make_variants(load_sample(), seed=11)


def _valid(values):
    return np.array([v for v in values if is_valid(v)])


def test_summarize_variants_counts_stats_and_selection(variants):
    summary = summarize(variants)
    json.dumps(summary, allow_nan=False)  # plain JSON for the card: no NaN, no numpy types
    assert summary["length_unit"] == "characters" and summary["score_columns"] == {"ifd": "ifd", "rifd": "rifd"}
    assert list(summary["splits"]) == list(VARIANT_SPLITS)
    for name in VARIANT_SPLITS:
        ds, entry = variants[name], summary["splits"][name]
        assert entry["rows"] == 40
        assert entry["score_status"] == dict(Counter(ds["score_status"]))
        if name != "origin":
            assert entry["reflection_status"] == dict(Counter(ds["reflection_status"]))
        ok = [s == "ok" for s in ds["score_status"]]
        ifd = _valid([v if k else None for v, k in zip(ds["ifd"], ok)])
        assert entry["ifd"]["count"] == len(ifd) and entry["ifd"]["missing"] == 40 - len(ifd)
        assert entry["ifd"]["mean"] == pytest.approx(ifd.mean())
        assert entry["ifd"]["median"] == pytest.approx(np.median(ifd))
        assert entry["ifd"]["above_one"] == int((ifd > 1).sum())
        rifd = _valid([v if k else None for v, k in zip(ds["rifd"], ok)])
        assert entry["rifd"]["q95"] == pytest.approx(np.quantile(rifd, 0.95))
        expected_ins = [len(i) + (len(x) + 1 if x else 0) for i, x in zip(ds["instruction"], ds["input"])]
        assert entry["lengths"]["instruction"]["mean"] == pytest.approx(np.mean(expected_ins))
        assert entry["lengths"]["response"]["max"] == max(len(o) for o in ds["output"])
        assert sum(summary["histograms"]["ifd"]["counts"][name]) == len(ifd)
    v2 = summary["selection"]["v2"]
    selected = Counter(select_v2(variants)["source"])
    assert v2["by_source"] == {s: selected[s] for s in ("reflect_response", "reflect_both")}
    counts = [n for _, n in v2["funnel"]]
    assert counts[0] == 40 and counts[-1] == v2["selected"] == sum(selected.values())
    assert counts == sorted(counts, reverse=True) and v2["funnel"][-1][0] == "selected"
    v1_ok = Counter(variants["reflect_both"]["reflection_status"])["ok"]
    assert summary["selection"]["v1"] == {"rows": 40, "reflection_ok": v1_ok}
    paper = summarize(variants, require_below_one=False, ratio="loss")["selection"]["v2"]
    assert "above_one" not in paper["rejected"] and paper["ratio"] == "loss"
    assert paper["selected"] == len(select_v2(variants, require_below_one=False, ratio="loss"))


def test_summarize_token_lengths_with_tokenizer(variants, smollm2_dir):
    from reflectune_hf.models import load_tokenizer

    tokenizer = load_tokenizer(smollm2_dir)
    entry = summarize({"origin": variants["origin"]}, tokenizer=tokenizer)
    assert entry["length_unit"] == "tokens"
    outputs = variants["origin"]["output"]
    tokens = [len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outputs]
    assert entry["splits"]["origin"]["lengths"]["response"]["median"] == pytest.approx(np.median(tokens))
    assert "selection" in entry and "v2" not in entry["selection"]


def test_summarize_single_dataset_and_unscored_data(variants):
    summary = summarize(select_v2(variants, require_below_one=False))
    assert list(summary["splits"]) == ["data"]
    assert summary["selection"]["by_source"]["data"] == summary["splits"]["data"]["source"]
    plain = summarize(load_sample())
    assert "ifd" not in plain["splits"]["data"] and "ifd" not in plain["histograms"]
    json.dumps(plain, allow_nan=False)
    with pytest.raises(TypeError, match="Dataset or a non-empty DatasetDict"):
        summarize([{"instruction": "x"}])


def test_plot_summary_writes_readable_pngs(variants, tmp_path):
    summary = json.loads(json.dumps(summarize(variants)))  # plots need nothing but the JSON summary
    paths = plot_summary(summary, tmp_path / "plots")
    assert [p.name for p in paths] == ["ifd_hist.png", "rifd_hist.png", "lengths.png", "selection_funnel.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 400
        assert image[..., :3].std() > 0.05  # something was drawn
    direct = plot_summary(variants["reflect_both"], tmp_path / "one")
    assert [p.name for p in direct] == ["ifd_hist.png", "rifd_hist.png", "lengths.png"]


def test_summarize_all_none_input_and_empty_datasets(variants):
    # An all-None column has Arrow's null type; a 0-row Dataset from lists has null types too.
    rows = Dataset.from_dict({"instruction": ["Say hi", "Add"], "input": [None, None], "output": ["Hi", None]})
    entry = summarize(rows)["splits"]["data"]
    assert entry["rows"] == 2 and entry["lengths"]["instruction"]["max"] == 6
    assert entry["lengths"]["response"]["min"] == 0  # a None output counts as ""
    for empty in (Dataset.from_dict({"instruction": [], "output": []}), variants["origin"].select([])):
        summary = summarize(empty)
        json.dumps(summary, allow_nan=False)
        entry = summary["splits"]["data"]
        assert entry["rows"] == 0 and entry["lengths"]["response"]["mean"] is None
    summary = summarize(DatasetDict({s: ds.select([]) for s, ds in variants.items()}))
    assert summary["selection"]["v2"]["selected"] == 0 and summary["selection"]["v1"]["rows"] == 0
    assert summary["splits"]["origin"]["ifd"]["count"] == 0


def test_plot_summary_copes_with_empty_splits(variants, tmp_path):
    cases = {
        "selected_empty": {"origin": variants["origin"], "selected": variants["reflect_both"].select([])},
        "all_empty": DatasetDict({s: ds.select([]) for s, ds in variants.items()}),
        "no_rows_at_all": Dataset.from_dict({"instruction": [], "input": [], "output": []}),
    }
    for name, data in cases.items():
        summary = json.loads(json.dumps(summarize(data)))
        paths = plot_summary(summary, tmp_path / name)
        expected = ["lengths.png"] if name == "no_rows_at_all" else ["ifd_hist.png", "rifd_hist.png", "lengths.png"]
        expected += ["selection_funnel.png"] if name == "all_empty" else []
        assert [p.name for p in paths] == expected, name
        for path in paths:
            image = imread(path)
            assert image.shape[0] > 200 and image[..., :3].std() > 0.02, (name, path.name)


def test_format_rates_leave_out_the_selected_split():
    """`selected` holds copies of the rows it picked: its "parsed 100%" measured the selection, not the oracle."""
    from datasets import Dataset

    from reflectune_hf.publishing.report import format_rates

    reflected = Dataset.from_dict({"format_outcome": ["first_try", "fallback"]})
    rates = format_rates({"reflect_response": reflected, "selected": reflected.select([0])})
    assert list(rates) == ["reflect_response"] and rates["reflect_response"]["parsed"] == 0.5
