"""Judge arithmetic: score parsing on judge texts we wrote, the two-order verdict rule on all nine
combinations, the summary and the stacked bar chart (REFERENCE.md §11)."""

from __future__ import annotations

import json
import math

import pytest
from matplotlib.image import imread

from reflectune_hf.evaluation.judge import format_judge_table, judge_summary, judge_verdict, parse_judge_scores, plot_judge

# (judge text, expected (Assistant 1, Assistant 2) scores or None when unparseable)
JUDGE_TEXTS = [
    ("8 7\nAssistant 1 is more detailed.", (8.0, 7.0)),                          # the requested form
    ("8, 7\nBoth are relevant.", (8.0, 7.0)),                                    # the reference's comma form
    ("7.5 9\nAssistant 2 explains the steps.", (7.5, 9.0)),                      # decimals
    ("  \n\n9 6\nLeading blank lines.", (9.0, 6.0)),
    ("Assistant 1: 8\nAssistant 2: 7\nExplanation follows.", (8.0, 7.0)),       # labelled, one per line
    ("**Assistant 1**: 8/10\n**Assistant 2**: 6.5/10", (8.0, 6.5)),             # markdown and /10
    ("Assistant 1 receives a score of 9, Assistant 2 receives a score of 4.", (9.0, 4.0)),
    ("Assistant 1's overall score is: **8**. Assistant 2's overall score is: **6**.", (8.0, 6.0)),
    ("Assistant 2: 5\nAssistant 1: 9", (9.0, 5.0)),                              # labels out of order
    ("Scores: 8 and 7\nThe first is better.", (8.0, 7.0)),
    ("The scores are 3 and 10.", (3.0, 10.0)),
    ("**Scores**\n8 7\nblah", (8.0, 7.0)),                                       # score line after a heading
    ("Here is my evaluation:\n\n9 / 10, 8 / 10", (9.0, 8.0)),
    ("8 out of 10, 7 out of 10", (8.0, 7.0)),
    ("10 10\nBoth perfect.", (10.0, 10.0)),
    ("0 0\nNeither answered.", (0.0, 0.0)),
    # unparseable: must never become a result
    ("Both answers are fine.", None),
    ("", None),
    ("   \n  ", None),
    ("11 12\nOut of range.", None),
    ("-1 -1", None),                                                              # the reference's failure marker
    ("Assistant 1 lists 3 tips while Assistant 2 lists 5.", None),               # numbers that are not scores
    ("1. Helpfulness: 8 vs 7\n2. Accuracy: 6 vs 9", None),                       # per-criterion, no overall line
    ("Assistant 1: 8", None),                                                     # one score only
    ("I would rate them highly because Assistant 2 was", None),                  # truncated prose
    ("8 7 6\nThree numbers.", None),
    ("1 and 2 are both fine", None),                                              # prose, two incidental numbers
    ("Both responses have 2 or 3 issues", None),
    ("Assistant 2 is better in 2 ways\n8 7", (8.0, 7.0)),                        # the score line below prose
    ("8/10 7/10\nClose call.", (8.0, 7.0)),
    ("Scores: 8 7", (8.0, 7.0)),
    ("[8, 7]", (8.0, 7.0)),
    ("8 vs. 7.5", (8.0, 7.5)),
    ("Assistant 1: 8. The answer covers every step. Assistant 2: 7. It skips one.", (8.0, 7.0)),
    ("I give 8 to the first and 7 to the second.", None),                        # no score line
    ("Response 1 scores 9 of 10 points.", None),
    # the first line's scores win over "Assistant N" numbers in the explanation (labels are a fallback)
    ("6 9\nAssistant 1 is 3 sentences long and Assistant 2 is 1 sentence long.", (6.0, 9.0)),
    ("8, 7\nAssistant 2: 3 errors. Assistant 1: 1 error.", (8.0, 7.0)),
    ("Scores: 4 9\nAssistant 1 gives 2 steps, Assistant 2 gives 6.", (4.0, 9.0)),
    # a numbered list: its index is never Assistant 1's score; items 1 and 2 give the pair, else None
    ("1. 8\n2. 7", (8.0, 7.0)),
    ("1) 8\n2) 7\nAssistant 1 is more detailed.", (8.0, 7.0)),
    ("**1.** 8/10\n**2.** 7/10", (8.0, 7.0)),
    ("(1) 6.5\n(2) 9", (6.5, 9.0)),
    ("1: 8\n2: 7", (8.0, 7.0)),
    ("Scores:\n1. 3\n2. 10\nAssistant 2 is complete.", (3.0, 10.0)),
    ("1. 8\n2. 7\n3. Explanation: both are relevant.", (8.0, 7.0)),
    ("1) 8", None),                                                               # one item only
    ("1. 8\nAssistant 1 is more detailed.", None),
    ("1. 8\nAssistant 1: 8, Assistant 2: 7", None),                              # the line is unreadable
    ("1. 8\n2. 7\n3. 9", None),                                                   # three items
    ("2. 8\n3. 7", None),
    ("8. 7", None),                                                               # item 8 or the pair (8, 7)
    ("1 8\n2 7", None),                                                          # the pair (1, 8) or a list
    ("1 - 8\n2 - 7", None),
    ("1 8\nAssistant 2 is better.", (1.0, 8.0)),                                # a plain pair line stays one
    ("8 7\n2 1", (8.0, 7.0)),
    # labelled scores after prose that counts things per assistant: the counts are no scores
    ("Assistant 1 is 2 paragraphs long and Assistant 2 is 5 paragraphs long.\nAssistant 1: 9\nAssistant 2: 6",
     (9.0, 6.0)),
    ("Assistant 1 gets 2 facts wrong. Assistant 2 gets 0 wrong.\nScores - Assistant 1: 4, Assistant 2: 9", (4.0, 9.0)),
    ("Assistant 1 scores 2 points higher on detail.\nAssistant 1: 8\nAssistant 2: 6", (8.0, 6.0)),
    ("Assistant 1 is 3 sentences long and Assistant 2 is 1 sentence long.", None),
    ("Assistant 1: 8\nAssistant 2: 7\nAssistant 1 is 3 sentences long.", (8.0, 7.0)),
    ("Assistant 2: 3 errors. Assistant 1: 1 error.\nAssistant 1: 8\nAssistant 2: 7", None),  # two values for one
    ("Assistant 1: 8-9\nAssistant 2: 8", None),                                  # a range is no score
    ("Assistant 1: 7 to 8, Assistant 2: 9", None),
    ("Assistant 1: 7 - Assistant 2: 9", (7.0, 9.0)),
]


@pytest.mark.parametrize("text,expected", JUDGE_TEXTS, ids=[f"text{i}" for i in range(len(JUDGE_TEXTS))])
def test_parse_judge_scores(text, expected):
    assert parse_judge_scores(text) == expected


def test_parse_judge_scores_non_strings():
    assert parse_judge_scores(None) is None
    assert parse_judge_scores(42) is None


def _order(sign: int) -> tuple[float, float]:
    """Scores (shown first, shown second) in one order where A is better (+1), tied (0) or worse (-1)."""
    return {1: (8.0, 6.0), 0: (7.0, 7.0), -1: (5.0, 9.0)}[sign]


# (A vs B in the A-first order, A vs B in the B-first order) -> verdict, per REFERENCE.md §11
NINE = {(1, 1): "win", (1, 0): "win", (0, 1): "win",
        (-1, -1): "lose", (-1, 0): "lose", (0, -1): "lose",
        (0, 0): "tie", (1, -1): "tie", (-1, 1): "tie"}


@pytest.mark.parametrize("first,second", sorted(NINE))
def test_verdict_all_nine_order_combinations(first, second):
    scores_ab = _order(first)                    # (A, B)
    a_second, b_first = _order(second)           # in the B-first order A is Assistant 2
    scores_ba = (b_first, a_second)              # as printed: (B, A)
    assert judge_verdict(scores_ab, scores_ba) == NINE[(first, second)]
    # Swapping the models' roles mirrors the verdict.
    mirrored = {"win": "lose", "lose": "win", "tie": "tie"}[NINE[(first, second)]]
    assert judge_verdict((scores_ab[1], scores_ab[0]), (scores_ba[1], scores_ba[0])) == mirrored


@pytest.mark.parametrize("scores_ab,scores_ba", [
    (None, (8, 7)), ((8, 7), None), (None, None), ((math.nan, math.nan), (8, 7)), ((8, 7), [7.0, math.nan]),
    ((8,), (7, 8)),
])
def test_verdict_error_without_scores(scores_ab, scores_ba):
    assert judge_verdict(scores_ab, scores_ba) == "error"


def test_position_bias_cancels():
    # A judge that adds 2 to whichever answer it sees first: equal answers come out as a tie.
    assert judge_verdict((9, 7), (9, 7)) == "tie"


def test_judge_summary_counts_and_win_score():
    verdicts = ["win"] * 5 + ["tie"] * 3 + ["lose"] * 2 + ["error"] * 4
    s = judge_summary({"verdict": verdicts})
    assert (s["rows"], s["wins"], s["ties"], s["losses"], s["errors"], s["judged"]) == (14, 5, 3, 2, 4, 10)
    assert s["win_score"] == pytest.approx((5 - 2) / 10 + 1)       # errors are not in "All"
    assert s["win_rate"] == 0.5 and s["tie_rate"] == 0.3 and s["lose_rate"] == 0.2
    json.dumps(s, allow_nan=False)
    nothing = judge_summary(["error", "error"])
    assert nothing["judged"] == 0 and nothing["win_score"] is None and nothing["win_rate"] is None
    with pytest.raises(ValueError, match="outside"):
        judge_summary({"verdict": ["win", "draw"]})


def test_plot_judge_png_and_table(tmp_path):
    summaries = {
        "vicuna": judge_summary(["win"] * 40 + ["tie"] * 25 + ["lose"] * 12 + ["error"] * 3),
        "koala": judge_summary(["win"] * 70 + ["tie"] * 60 + ["lose"] * 50),
        "lima": judge_summary(["error"] * 5),
    }
    path = plot_judge(summaries, tmp_path / "sub" / "judge.png", title="recycled vs alpaca",
                      labels=("recycled", "alpaca"))
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 150 and image.shape[1] > 600
    assert plot_judge(summaries["vicuna"], tmp_path / "one.png").is_file()  # a single summary: one bar
    with pytest.raises(ValueError):
        plot_judge({}, tmp_path / "none.png")
    table = format_judge_table(summaries).splitlines()
    assert table[2].split() == ["vicuna", "40", "25", "12", "3", "1.364"]
    assert table[4].split()[-1] == "n/a"
