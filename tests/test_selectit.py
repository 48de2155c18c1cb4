"""SelectIT: hand-computed formulas, rating-token lookup, batched scoring with real models."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from datasets import Dataset

from reflectune_hf.prompts import SELECTIT_RATING_LINES
from reflectune_hf.scoring.selectit import (
    RatingTokenError,
    SelectITScorer,
    model_scores,
    model_weights,
    normalize_ratings,
    rating_distribution,
    rating_prompts_for,
    rating_token_ids,
    sentence_scores,
    token_scores,
)

SMOL = "smollm2-135m-instruct"
GEMMA = "gemma3-270m"


# --------------------------------------------------------------------------- formulas


def test_token_score_paper_hand_computed():
    # P' = P (sums to 1); rating 3; sum |P'_i - 0.4| = 0.3 + 0.2 + 0 + 0.2 + 0.3 = 1.0; / 4 -> 0.25
    assert token_scores([0.1, 0.2, 0.4, 0.2, 0.1]) == pytest.approx(0.75)
    # Unnormalised probabilities (the rest of the vocabulary holds half the mass): same P'.
    assert token_scores([0.05, 0.1, 0.2, 0.1, 0.05]) == pytest.approx(0.75)
    assert normalize_ratings([0.05, 0.1, 0.2, 0.1, 0.05]).tolist() == pytest.approx([0.1, 0.2, 0.4, 0.2, 0.1])
    # Certain "5": 5 * (1 + 1 + 1 + 1) / 4; uniform: rating 1 (ties go low) * 0.
    assert token_scores([0.0, 0.0, 0.0, 0.0, 0.3]) == pytest.approx(5.0)
    assert token_scores([0.2] * 5) == pytest.approx(0.0)
    # P' = [0, 0, .25, .75, 0]: rating 4 * (.75 + .75 + .5 + 0 + .75) / 4 = 2.75
    assert token_scores([0.0, 0.0, 0.2, 0.6, 0.0]) == pytest.approx(2.75)


def test_token_score_reference_exp_renormalisation_hand_computed():
    # P' = softmax(P / sum P) = softmax([.1, .2, .4, .2, .1]):
    # e^.1 = 1.1051709, e^.2 = 1.2214028, e^.4 = 1.4918247, sum = 6.1449722
    # P'max = .2427710, P'(.2) = .1987640, P'(.1) = .1798493
    # spread = 2 * (.2427710 - .1798493) + 2 * (.2427710 - .1987640) = .2138574; / 4 * 3 = .1603931
    assert token_scores([0.1, 0.2, 0.4, 0.2, 0.1], formula="reference") == pytest.approx(0.1603931, abs=1e-6)
    # The exp-renormalisation flattens: its scores are far smaller than the paper's.
    assert token_scores([0.0, 0.0, 0.0, 0.0, 1.0], formula="reference") == pytest.approx(
        5 * (math.e - 1) / (math.e + 4), abs=1e-9)
    with pytest.raises(ValueError, match="formula"):
        token_scores([0.2] * 5, formula="other")


def test_token_score_reference_spread_follows_the_prompt_count():
    """The reference code sums the spread over the first k ratings and divides by k - 1 (k the
    number of prompts); at k = 5 that is the paper's spread over all five ratings."""
    p = [0.1, 0.2, 0.4, 0.2, 0.1]
    q = [math.exp(x) for x in p]
    q = [x / sum(q) for x in q]  # softmax(P / sum P), sum P = 1
    top = max(q)
    for k in (2, 3, 4):
        expected = 3 * sum(top - x for x in q[:k]) / (k - 1)
        assert token_scores(p, formula="reference", k=k) == pytest.approx(expected, abs=1e-12)
    assert token_scores(p, formula="reference", k=5) == pytest.approx(token_scores(p, formula="reference"))
    assert math.isnan(token_scores(p, formula="reference", k=1))
    assert token_scores(p, k=2) == pytest.approx(token_scores(p)), "the paper form ignores k"
    with pytest.raises(ValueError, match="needs k >= 2"):
        SelectITScorer(k=1, formula="reference")


def test_token_scores_vectorised_and_undefined_values_are_nan():
    p = np.array([[[0.1, 0.2, 0.4, 0.2, 0.1], [0, 0, 0, 0, 0]], [[np.nan, 0.1, 0.1, 0.1, 0.1], [0, 0, 0, 0, 1]]])
    scores = token_scores(p)
    assert scores.shape == (2, 2)
    assert scores[0, 0] == pytest.approx(0.75) and scores[1, 1] == pytest.approx(5.0)
    assert math.isnan(scores[0, 1]) and math.isnan(scores[1, 0])  # zero mass, NaN input: never 0


def test_sentence_score_hand_computed():
    # mean 3, population std sqrt(2): 3 / (1 + 0.2 * 1.4142136) = 3 / 1.2828427 = 2.3385564
    assert sentence_scores([1.0, 2.0, 3.0, 4.0, 5.0], alpha=0.2) == pytest.approx(2.3385564, abs=1e-7)
    assert sentence_scores([1.0, 2.0, 3.0, 4.0, 5.0], alpha=0.0) == pytest.approx(3.0)
    assert sentence_scores([0.75], alpha=0.2) == pytest.approx(0.75)  # k = 1: the token score
    rows = sentence_scores(np.array([[2.0, 2.0], [1.0, np.nan]]), alpha=0.5)
    assert rows[0] == pytest.approx(2.0) and math.isnan(rows[1])


def test_model_score_uses_parameter_counts():
    assert model_weights([135, 270]).tolist() == pytest.approx([1 / 3, 2 / 3])
    assert model_scores([2.0, 4.0], [135, 270]) == pytest.approx(10 / 3)
    # 7B / 13B / 70B: 7/90, 13/90, 70/90 (not the reference's 7/20, 13/20, 70/90)
    assert model_scores([1.0, 1.0, 1.0], [7, 13, 70]) == pytest.approx(1.0)
    assert model_scores([[1.0, 2.0, 3.0]], [7, 13, 70])[0] == pytest.approx((7 + 26 + 210) / 90)
    assert math.isnan(model_scores([np.nan, 1.0], [1, 1]))
    with pytest.raises(ValueError, match="positive"):
        model_weights([1, 0])


def test_rating_distribution_sums_spellings():
    probs = np.array([0.01, 0.1, 0.2, 0.3, 0.05, 0.04, 0.15, 0.15])
    p = rating_distribution(probs, [(1,), (2, 6), (3,), (4,), (5, 7)])
    assert p.tolist() == pytest.approx([0.1, 0.35, 0.3, 0.05, 0.19])


def test_rating_prompt_is_built_as_the_reference_writes_it():
    line = SELECTIT_RATING_LINES[0]
    with_input = rating_prompts_for("Translate.", "Bonjour", "Hello", [line])[0]
    assert with_input == line + "\nInstruction:Translate.\nBonjour\nResponse:Hello\nThe answer is: \n"
    without = rating_prompts_for("Say hi.", "", "Hi", SELECTIT_RATING_LINES[:3])
    assert [p.split("\n")[0] for p in without] == list(SELECTIT_RATING_LINES[:3])
    assert without[0] == line + "\nInstruction:Say hi.\nResponse:Hi\nThe answer is: \n"


def test_configuration_is_checked_up_front():
    with pytest.raises(ValueError, match="k must be"):
        SelectITScorer(k=10)
    with pytest.raises(ValueError, match="k must be"):
        SelectITScorer(k=3, rating_prompts=["a", "b"])
    with pytest.raises(ValueError, match="not one string"):
        SelectITScorer(rating_prompts="Rate it.", k=1)
    with pytest.raises(ValueError, match="formula"):
        SelectITScorer(formula="exp")
    with pytest.raises(ValueError, match="alpha"):
        SelectITScorer(alpha=-1)
    with pytest.raises(ValueError, match="models"):
        SelectITScorer(models=())
    with pytest.raises(ValueError, match="dtype"):
        SelectITScorer(dtype="int8")
    assert SelectITScorer(models=SMOL, k=2).rating_prompts == SELECTIT_RATING_LINES[:2]


def test_selection_with_top_k_by():
    select = pytest.importorskip("reflectune_hf.selection.select", reason="reflectune_hf.selection.select comes with issue 6")
    ds = Dataset.from_dict({"id": list(range(10)),
                            "selectit_model": [0.5, 4.2, math.nan, 1.5, 3.9, 0.1, 2.0, 0.2, 2.5, 1.0]})
    chosen = select.top_k_by(ds, "selectit_model", fraction=0.2, max_value=None)
    assert chosen["id"] == [1, 4]


# --------------------------------------------------------------------------- rating tokens


def _word_tokenizer(digits: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "Rate": 1}
    for i, d in enumerate(digits):
        vocab[d], vocab["Ġ" + d] = 10 + i, 20 + i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_rating_ids_with_and_without_leading_space():
    assert rating_token_ids(_word_tokenizer("12345")) == ((10, 20), (11, 21), (12, 22), (13, 23), (14, 24))


def test_tokenizer_without_single_token_digits_is_a_clear_error():
    with pytest.raises(RatingTokenError, match=r"no single token for the rating\(s\) \['3', '5'\]"):
        rating_token_ids(_word_tokenizer("124"))


def test_rating_ids_of_smollm2():
    from reflectune_hf.models import load_tokenizer

    assert rating_token_ids(load_tokenizer(SMOL)) == ((33,), (34,), (35,), (36,), (37,))


@pytest.mark.slow
def test_rating_ids_of_gemma3():
    from reflectune_hf.models import load_tokenizer

    tok = load_tokenizer(GEMMA)  # converts the embedded GGUF on first use
    ids = rating_token_ids(tok)
    assert ids == ((236770,), (236778,), (236800,), (236812,), (236810,))
    assert [tok.decode(list(i)) for i in ids] == ["1", "2", "3", "4", "5"]
    assert tok(" 1", add_special_tokens=False).input_ids != [ids[0][0]]  # " 1" is two tokens in Gemma-3


# --------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def smol_raters():
    scorer = SelectITScorer(models=SMOL, k=2)
    return scorer.raters()


def _scorer(raters, **kwargs):
    scorer = SelectITScorer(models=[r.name for r in raters], **kwargs)
    scorer._raters = raters  # share the loaded models between configurations
    return scorer


ROWS = {
    "instruction": ["Name a primary colour.", "Translate to French.", "Write a haiku about rain.",
                    "Add the numbers.", "Explain recursion in one sentence."],
    "input": ["", "Good morning", "", "2 + 3", ""],
    "output": ["Red.", "Bonjour", "Rain taps on the roof / puddles hold the grey sky / the street smells of earth.",
               "5", "Recursion is when a function calls itself on a smaller part of the problem."],
}


def test_batch_size_does_not_change_scores(smol_raters):
    one = _scorer(smol_raters, k=2, batch_size=1)(dict(ROWS))
    many = _scorer(smol_raters, k=2, batch_size=8)(dict(ROWS))
    assert one["selectit_status"] == many["selectit_status"] == ["ok"] * 5
    for column in ("selectit_token", "selectit_sentence"):
        assert np.all(np.isfinite(one[column])) and all(0 <= s <= 5 for s in one[column])
        np.testing.assert_allclose(many[column], one[column], rtol=0, atol=1e-5)
    # The first prompts of all rows in one left-padded forward give the one-by-one token scores.
    rater = smol_raters[0]
    ids = rater.tokenizer([p for i in range(5) for p in rating_prompts_for(
        ROWS["instruction"][i], ROWS["input"][i], ROWS["output"][i], SELECTIT_RATING_LINES[:1])])["input_ids"]
    probs = rater.ratings(ids)
    assert probs.shape == (5, 5) and (probs > 0).all() and (probs.sum(-1) < 1).all()
    np.testing.assert_allclose(token_scores(probs), one["selectit_token"], rtol=0, atol=1e-5)
    assert not np.allclose(token_scores(probs, "reference"), token_scores(probs))  # the two formulas differ


def test_failed_rows_are_nan_with_a_status_in_place(smol_raters, monkeypatch):
    rows = {key: list(values) for key, values in ROWS.items()}
    rows["output"][1] = "  "  # empty output
    rows["output"][3] = "word " * 400  # over max_length
    scorer = _scorer(smol_raters, k=2, max_length=300)
    bad_prompt = smol_raters[0].tokenizer(rating_prompts_for(rows["instruction"][2], "", rows["output"][2],
                                                             scorer.rating_prompts))["input_ids"][0]
    real = type(smol_raters[0]).ratings

    def flaky(self, batch_ids):
        if bad_prompt in batch_ids:
            raise RuntimeError("boom")
        return real(self, batch_ids)

    monkeypatch.setattr(type(smol_raters[0]), "ratings", flaky)
    out = scorer(rows)
    assert out["selectit_status"][1] == "empty_output"
    assert out["selectit_status"][3] == f"too_long:{SMOL}"
    assert out["selectit_status"][2] == f"error:{SMOL}:RuntimeError: boom"
    assert all(math.isnan(out[c][i]) for c in ("selectit_token", "selectit_sentence") for i in (1, 2, 3))
    monkeypatch.setattr(type(smol_raters[0]), "ratings", real)
    good = _scorer(smol_raters, k=2)({key: [values[i] for i in (0, 4)] for key, values in rows.items()})
    assert out["selectit_status"][0] == out["selectit_status"][4] == "ok"
    np.testing.assert_allclose([out["selectit_sentence"][i] for i in (0, 4)], good["selectit_sentence"], atol=1e-5)


def test_map_keeps_rows_and_fingerprint_is_stable(smol_raters, sample):
    from datasets.fingerprint import Hasher

    ds = sample.select(range(3))
    scorer = _scorer(smol_raters, k=1)
    before = Hasher.hash(scorer)
    scored = ds.map(scorer, batched=True, batch_size=2)
    assert scored["id"] == ds["id"] and scored.column_names == ds.column_names + [
        "selectit_token", "selectit_sentence", "selectit_status", "selectit_sentence_by_model", "selectit_model"]
    assert scored["selectit_status"] == ["ok"] * 3
    # One model: the model level is the sentence score, so the README's selection works as written.
    assert scored["selectit_model"] == scored["selectit_sentence"]
    assert scored["selectit_sentence_by_model"] == [[s] for s in scored["selectit_sentence"]]
    assert scored["selectit_token"] == pytest.approx(scored["selectit_sentence"])  # k = 1
    assert Hasher.hash(scorer) == before  # loading models does not change the fingerprint
    assert pickle.loads(pickle.dumps(scorer))._raters is None  # the models never travel
    fresh = SelectITScorer(models=SMOL, k=1)
    assert Hasher.hash(fresh) == before
    again = ds.map(fresh, batched=True, batch_size=2)  # served from datasets' cache
    assert fresh._raters is None and again["selectit_sentence"] == scored["selectit_sentence"]
    for other in (SelectITScorer(models=SMOL, k=2), SelectITScorer(models=SMOL, k=1, alpha=0.3),
                  SelectITScorer(models=(SMOL, SMOL), k=1)):
        assert Hasher.hash(other) != before
    assert Hasher.hash(SelectITScorer(models=SMOL, k=2)) != Hasher.hash(SelectITScorer(models=SMOL, k=2,
                                                                                      formula="reference"))
    one = scorer(ds[0])  # map without batched=True
    assert one["selectit_status"] == "ok" and one["selectit_sentence"] == pytest.approx(scored[0]["selectit_sentence"])


def test_one_model_run_has_the_model_level_column(smol_raters):
    rows = {key: list(values) for key, values in ROWS.items()}
    rows["output"][1] = " "  # a failed row: NaN in every score column, the model level included
    out = _scorer(smol_raters, k=2)(rows)
    assert len(out["selectit_model"]) == 5 and math.isnan(out["selectit_model"][1])
    np.testing.assert_array_equal(out["selectit_model"], out["selectit_sentence"])
    assert [len(v) for v in out["selectit_sentence_by_model"]] == [1] * 5
    from reflectune_hf.selection.select import top_k_by

    chosen = top_k_by(Dataset.from_dict(out), "selectit_model", fraction=0.5, max_value=None)
    assert chosen.num_rows == 3 and not any(math.isnan(s) for s in chosen["selectit_model"])  # ceil(2.5)


def test_missing_columns_and_wrong_types_are_clear_errors(smol_raters):
    from reflectune_hf.data import ColumnError

    scorer = _scorer(smol_raters, k=1)
    with pytest.raises(ColumnError, match=r"SelectITScorer needs the column\(s\) \['output'\]"):
        scorer({"instruction": ["a"]})
    with pytest.raises(ColumnError, match="must hold strings"):
        scorer({"instruction": ["a"], "output": [3]})


@pytest.mark.slow
def test_two_model_run_on_the_sample(sample):
    # 12 rows (inputs, a long and a very short output among them) and k = 2: 48 forward passes per
    # model; the whole 40-row sample added time, not coverage.
    sample = sample.select([*range(10), 19, 22])
    scorer = SelectITScorer(models=(SMOL, GEMMA), k=2)
    scored = sample.map(scorer, batched=True, batch_size=6)
    assert scored["id"] == sample["id"]
    assert scored["selectit_status"] == ["ok"] * len(sample)
    for column in ("selectit_token", "selectit_sentence", "selectit_model"):
        values = np.array(scored[column])
        assert np.isfinite(values).all() and (values >= 0).all() and (values <= 5).all(), column
    by_model = np.array(scored["selectit_sentence_by_model"])
    weights = scorer.weights
    assert weights[1] > weights[0] and weights.sum() == pytest.approx(1.0)  # Gemma-3-270M is larger
    np.testing.assert_allclose(scored["selectit_model"], by_model @ weights, atol=1e-12)
    np.testing.assert_allclose(scored["selectit_sentence"], by_model[:, 0], atol=1e-12)
    assert np.std(scored["selectit_model"]) > 0  # the scores tell rows apart

    # Gemma-3 (sliding-window attention, BOS) is batch-invariant with left padding too.
    gemma = [r for r in scorer.raters() if r.name == GEMMA]
    rows = sample.select([2, 10, 11])[:]  # an input, a long and a very short output
    one = _scorer(gemma, k=2, batch_size=1)(rows)
    np.testing.assert_allclose(one["selectit_sentence"], by_model[[2, 10, 11], 1], rtol=0, atol=1e-5)


def test_one_example_with_a_none_instruction_or_output_is_flagged_not_a_crash():
    """Single mode (`map` without batched=True) was detected by `instruction` being a str, so an
    example whose instruction is None was read as a batch and crashed (`len(None)`). It is now
    detected as IFDScorer does (from `output`), and the row gets its empty-text status."""
    scorer = SelectITScorer(k=1, max_length=64)  # no row is rated: no model is loaded
    scored = Dataset.from_dict({"instruction": [None, "Name a colour."], "output": ["Blue.", None]}).map(scorer)
    assert scored["selectit_status"] == ["empty_instruction", "empty_output"]
    assert all(math.isnan(v) for v in list(scored["selectit_sentence"]) + list(scored["selectit_model"]))
    assert scorer({"instruction": None, "output": None})["selectit_status"] == "empty_instruction;empty_output"
    assert scorer._raters is None


def test_text_that_is_not_utf8_gets_a_status_not_a_crash_of_the_batch(smol_raters):
    """A lone surrogate (streaming data from a generator; Arrow refuses them) made the tokenizer
    raise a TypeError that stopped the whole batch: the row now says `invalid_text`."""
    rows = {"instruction": ["Name a colour\ud800", "Name a colour."], "input": ["", ""], "output": ["Blue.", "Blue."]}
    out = _scorer(smol_raters, k=2)(rows)
    assert out["selectit_status"] == ["invalid_text", "ok"]
    assert math.isnan(out["selectit_sentence"][0]) and math.isnan(out["selectit_model"][0])
