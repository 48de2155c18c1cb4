"""Data-quality report: real MiniLM coherence, perplexity from scorer columns or a student model,
token lengths, IFD, and what is said when something is omitted (REFERENCE.md §11)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from datasets import Dataset, DatasetDict

import reflectune_hf.evaluation.quality as quality_mod
from reflectune_hf.models import load_causal_lm
from reflectune_hf.prompts import get_scoring_template
from reflectune_hf.evaluation.quality import (EmbeddingModelNotAvailable, MiniLMEmbedder, coherence_scores, minilm_path,
                                   quality_report, response_perplexity)


@pytest.fixture(scope="module")
def embedder():
    return MiniLMEmbedder(batch_size=32)


@pytest.fixture(scope="module")
def student(smollm2_dir):
    return load_causal_lm(smollm2_dir, device="cpu")


def _shuffled(ds, seed=0):
    """The same rows with every response moved to another row's instruction."""
    n = len(ds)
    perm = np.random.default_rng(seed).permutation(n)
    perm = np.where(perm == np.arange(n), np.roll(perm, 1), perm)   # no row keeps its own response
    assert not (perm == np.arange(n)).any()
    outputs = list(ds["output"])
    return ds.remove_columns("output").add_column("output", [outputs[i] for i in perm])


def test_coherence_matched_beats_shuffled(sample, student, embedder):
    tokenizer = student[1]
    matched = quality_report(sample, tokenizer=tokenizer, embedder=embedder)["splits"]["data"]["coherence"]
    shuffled = quality_report(_shuffled(sample), tokenizer=tokenizer, embedder=embedder)["splits"]["data"]["coherence"]
    assert matched["count"] == shuffled["count"] == 40 and matched["missing"] == 0
    assert matched["mean"] > shuffled["mean"] + 0.2
    assert -1.0 <= shuffled["min"] <= matched["max"] <= 1.0
    assert matched["median"] > shuffled["q95"] - 0.2


def test_minilm_matches_sentence_transformers(embedder):
    st = pytest.importorskip("sentence_transformers")
    texts = ["A cat sat on the mat.", "", "Explain photosynthesis. " * 80, "Quantum computing basics"]
    reference = st.SentenceTransformer(str(minilm_path()), device="cpu").encode(texts, normalize_embeddings=True)
    assert np.abs(embedder.encode(texts) - reference).max() < 1e-5      # mean pooling, 256-token truncation


def test_coherence_scores_blank_and_mismatch(embedder):
    scores = coherence_scores(["Name a fruit.", " ", "Name a fruit."], ["An apple.", "x", ""], embedder)
    assert scores[0] > 0.3 and math.isnan(scores[1]) and math.isnan(scores[2])
    with pytest.raises(ValueError, match="2 instructions but 1 responses"):
        coherence_scores(["a", "b"], ["c"], embedder)


def _scored(ds, seed):
    rng = np.random.default_rng(seed)
    n = len(ds)
    losses = {c: rng.uniform(0.5, 3.0, n) for c in ("loss_ins_alone", "loss_out_alone", "loss_ins_condition",
                                                       "loss_out_condition")}
    status = ["ok"] * n
    status[0] = status[1] = "error"
    ifd = np.exp(losses["loss_out_condition"] - losses["loss_out_alone"])
    ifd[0] = ifd[1] = 0.0           # the reference's failure marker must not count
    return ds.add_column("score_status", status).add_column("ifd", ifd.tolist()), losses


def test_quality_report_from_scorer_columns(sample, student, embedder):
    tokenizer = student[1]
    origin, losses = _scored(sample, 0)
    for name, values in losses.items():
        origin = origin.add_column(name.replace("loss_", "ppl_"), np.exp(values).tolist())
    only_losses, losses_b = _scored(sample.select(range(10)), 1)
    for name, values in losses_b.items():
        only_losses = only_losses.add_column(name, values.tolist())
    report = quality_report(DatasetDict({"origin": origin, "reflect": only_losses}), tokenizer=tokenizer,
                            embedder=embedder)
    json.dumps(report, allow_nan=False)
    assert report["length_unit"] == "tokens" and list(report["splits"]) == ["origin", "reflect"]
    entry = report["splits"]["origin"]
    ppl = entry["perplexity"]
    assert ppl["source"] == "columns" and set(ppl["columns"]) == {"ppl_ins_alone", "ppl_out_alone",
                                                                  "ppl_ins_condition", "ppl_out_condition"}
    expected = np.exp(losses["loss_out_condition"][2:])        # rows whose score_status is not ok are missing
    assert ppl["columns"]["ppl_out_condition"]["count"] == 38
    assert ppl["columns"]["ppl_out_condition"]["missing"] == 2
    assert ppl["columns"]["ppl_out_condition"]["mean"] == pytest.approx(expected.mean())
    assert entry["ifd"]["count"] == 38 and entry["ifd"]["missing"] == 2
    n_tokens = len(tokenizer(sample[5]["output"], add_special_tokens=False)["input_ids"])
    lengths = [len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in sample["output"]]
    assert entry["lengths"]["response"]["max"] == max(lengths) and n_tokens in lengths
    reflect = report["splits"]["reflect"]
    assert reflect["rows"] == 10
    assert reflect["perplexity"]["columns"]["ppl_ins_alone"]["mean"] == pytest.approx(
        np.exp(losses_b["loss_ins_alone"][2:]).mean())                # exp of the loss columns
    assert reflect["coherence"]["count"] == 10


def test_quality_report_says_what_is_omitted(sample, student, monkeypatch):
    small = sample.select(range(4))
    report = quality_report(small, tokenizer=student[1], coherence=False)
    entry = report["splits"]["data"]
    assert "no student" in entry["perplexity"]["omitted"] and entry["coherence"] == {"omitted": "coherence=False"}
    assert entry["ifd"] == {"omitted": "no 'ifd' column (IFDScorer)"} and report["embedding_model"] is None

    def missing():
        raise EmbeddingModelNotAvailable("Coherence needs the all-MiniLM-L6-v2 model of the package ...\npip ...")

    monkeypatch.setattr(quality_mod, "minilm_path", missing)
    entry = quality_report(small, tokenizer=student[1])["splits"]["data"]
    assert entry["coherence"]["omitted"].startswith("Coherence needs")
    with pytest.raises(EmbeddingModelNotAvailable):
        quality_report(small, tokenizer=student[1], coherence=True)
    with pytest.raises(TypeError):
        quality_report([{"instruction": "x"}])


SPLIT_KEYS = ["rows", "lengths", "perplexity", "coherence", "ifd", "rifd"]
STATS_KEYS = ["count", "mean", "std", "min", "q05", "q25", "median", "q75", "q95", "max"]


def test_quality_report_shape_on_empty_unscored_and_undefined_splits(sample, student, embedder):
    """Every split has the documented keys, JSON without NaN, also with 0 rows, no scores, or only NaN."""
    strings = {"instruction": [], "input": [], "output": []}
    empty = Dataset.from_dict(strings, features=sample.select_columns(list(strings)).features)
    blank = Dataset.from_dict({"instruction": ["Say hi.", "Name a colour."], "output": ["", "  "]})
    undefined = Dataset.from_dict({"instruction": ["Say hi.", "Add 2 and 2."], "output": ["Hi.", "4"],
                                   "ifd": [math.nan, math.nan], "rifd": [math.inf, None],
                                   "ppl_out_condition": [math.nan, math.inf]})
    data = DatasetDict({"empty": empty, "unscored": sample.select(range(2)), "blank": blank, "undefined": undefined})
    report = quality_report(data, student=student, embedder=embedder)
    json.dumps(report, allow_nan=False)
    assert list(report) == ["length_unit", "tokenizer", "student", "embedding_model", "splits"]
    assert list(report["splits"]) == list(data) and report["embedding_model"] == "MiniLMEmbedder"
    for name, entry in report["splits"].items():
        assert list(entry) == SPLIT_KEYS, name
        for section in ("instruction", "response"):
            assert list(entry["lengths"][section]) == STATS_KEYS
        for key in ("coherence", "ifd", "rifd"):
            section = entry[key]
            assert list(section) == ["omitted"] or list(section)[:len(STATS_KEYS)] == STATS_KEYS, (name, key)
            if "count" in section:
                assert section["count"] + section["missing"] == entry["rows"], (name, key)
    nothing = dict.fromkeys(STATS_KEYS[1:])
    empty_entry = report["splits"]["empty"]
    assert empty_entry["rows"] == 0 and empty_entry["lengths"]["response"] == {"count": 0, **nothing}
    assert empty_entry["perplexity"]["columns"]["ppl_out_condition"] == {"count": 0, **nothing, "missing": 0}
    assert empty_entry["coherence"] == {"count": 0, **nothing, "missing": 0}
    assert empty_entry["ifd"] == {"omitted": "no 'ifd' column (IFDScorer)"}
    unscored = report["splits"]["unscored"]
    assert unscored["perplexity"]["source"].startswith("student") and unscored["coherence"]["count"] == 2
    assert unscored["ifd"]["omitted"] and unscored["rifd"]["omitted"]
    blank_entry = report["splits"]["blank"]
    assert blank_entry["coherence"] == {"count": 0, **nothing, "missing": 2}
    assert blank_entry["perplexity"]["columns"]["ppl_out_condition"]["missing"] == 2
    undefined_entry = report["splits"]["undefined"]
    assert undefined_entry["perplexity"] == {"source": "columns",
                                             "columns": {"ppl_out_condition": {"count": 0, **nothing, "missing": 2}}}
    assert undefined_entry["ifd"] == {"count": 0, **nothing, "missing": 2, "above_one": 0}
    assert undefined_entry["rifd"]["count"] == 0 and undefined_entry["rifd"]["missing"] == 2


def test_quality_report_student_perplexity(sample, student):
    import torch
    from transformers import AutoTokenizer

    model, tokenizer = student
    shortest = np.argsort([len(q) + len(i) + len(o) for q, i, o in zip(sample["instruction"], sample["input"],
                                                                         sample["output"])])[:4]
    rows = sample.select(shortest).to_list()
    rows[3]["output"] = ""                                             # nothing to score: missing, not 0
    # Lengths in another tokenizer's tokens must not change the student's perplexity.
    bert = AutoTokenizer.from_pretrained(str(minilm_path()))
    report = quality_report(Dataset.from_list(rows), student=student, tokenizer=bert, coherence=False)
    ppl = report["splits"]["data"]["perplexity"]
    assert ppl["source"].startswith("student") and ppl["template"] == "vicuna"
    stats = ppl["columns"]["ppl_out_condition"]
    assert stats["count"] == 3 and stats["missing"] == 1 and stats["min"] > 1.0
    assert report["splits"]["data"]["lengths"]["response"]["max"] == max(
        len(bert(r["output"], add_special_tokens=False)["input_ids"]) for r in rows)
    tmpl = get_scoring_template("vicuna")
    prompts = [tmpl.format(r["instruction"], r["input"]) for r in rows]
    ours = response_perplexity(model, tokenizer, prompts, [r["output"] for r in rows], batch_size=2)
    assert math.isnan(ours[3]) and stats["mean"] == pytest.approx(np.nanmean(ours), rel=1e-4)  # batch padding: fp32 noise
    # Each batched value (padded beside longer rows) equals transformers' own loss on the response tokens.
    for prompt, row, value in zip(prompts[:3], rows, ours):
        ids = tokenizer(prompt + row["output"], return_tensors="pt")["input_ids"]
        labels = ids.clone()
        labels[:, :len(tokenizer(prompt)["input_ids"])] = -100
        with torch.inference_mode():
            loss = model(input_ids=ids, labels=labels).loss.item()
        assert value == pytest.approx(math.exp(loss), rel=1e-5)


# Rows whose response starts with characters SmolLM2's byte-level BPE merges with the prompt's
# last ":" ("### Response:" + "-)" is "ĠResponse", ":-", ")"): the merged token is context, as in IFD.
MERGE_ROWS = [{"instruction": "Smile.", "input": "", "output": "-) ok"},
              {"instruction": "Smile.", "input": "", "output": ":-) sure"},
              {"instruction": "Whose?", "input": "Tom", "output": "'s fine"},
              {"instruction": "Smile.", "input": "", "output": "-"}]  # all merged: nothing scored


def test_response_perplexity_is_ifds_out_condition(sample, student):
    """The quality report's perplexity is `exp(loss_out_condition)` of IFDScorer (same template,
    same rows): one boundary rule, one loss engine."""
    from reflectune_hf.scoring.ifd import IFDScorer

    model, tokenizer = student
    shortest = np.argsort([len(q) + len(i) + len(o) for q, i, o in zip(sample["instruction"], sample["input"],
                                                                         sample["output"])])[:4]
    rows = sample.select(shortest).to_list() + MERGE_ROWS
    scorer = IFDScorer(template="alpaca")
    ifd = scorer({k: [r[k] for r in rows] for k in ("instruction", "input", "output")})
    tmpl = get_scoring_template("alpaca")
    prompts = [tmpl.format(r["instruction"], r["input"]) for r in rows]
    ours = response_perplexity(model, tokenizer, prompts, [r["output"] for r in rows], batch_size=2)
    assert "no_scored_token:out_condition" in ifd["score_status"][-1] and math.isnan(ours[-1])
    losses = np.array(ifd["loss_out_condition"][:-1])
    assert np.isfinite(losses).all()
    # Same spans, same engine; the micro-batches differ (fp32 rounding: 1e-6 of the loss; its exp
    # amplifies that by the loss itself).
    assert np.allclose(np.log(ours[:-1]), losses, rtol=1e-6, atol=0)
    assert np.allclose(ours[:-1], np.exp(losses), rtol=1e-5, atol=0)


def test_response_perplexity_scores_from_the_prompts_token_count(student):
    """Where the joint text splits the prompt's last token (SmolLM2: "::" alone, ":" + ":**"
    after it), the response starts at `len(tok(prompt))`, the reference's boundary, not at the
    first token after the prompt's characters."""
    import torch

    model, tokenizer = student
    prompt, response = "Reply with stars. ASSISTANT::", "** ok then"
    joint = tokenizer(prompt + response, return_offsets_mapping=True)
    start = len(tokenizer(prompt)["input_ids"])
    first_after = next(k for k, (s, e) in enumerate(joint["offset_mapping"]) if s >= len(prompt))
    assert first_after == start + 1  # the two rules disagree here
    ids = torch.tensor([joint["input_ids"]])
    labels = ids.clone()
    labels[:, :start] = -100
    with torch.inference_mode():
        expected = math.exp(model(input_ids=ids, labels=labels).loss.item())
    ours = response_perplexity(model, tokenizer, [prompt, prompt], [response, "   "])
    assert ours[0] == pytest.approx(expected, rel=1e-5) and math.isnan(ours[1])  # blank: NaN
