"""The pairwise judge's arithmetic: score parsing, the two-order verdict, the summary and its chart
(REFERENCE.md §11). Pure functions: the stage that calls the judge is `evaluate.PairwiseJudge`.

The judge is asked to put the two scores alone on its first line. Judges (small ones above all)
write "8 7", "8, 7", "Assistant 1: 8/10 ... Assistant 2: 7/10", "Scores: 8.5 and 7", a numbered
list ("1. 8" then "2. 7") or prose with no score at all. `parse_judge_scores` reads all of these
and returns `None` when it cannot tell the two scores apart, where the reference code returned
[-1, -1] and later counted it.
A row with an unparsed order gets the verdict `"error"`, which `judge_summary` counts apart.

Example:
    >>> from reflectune_hf.evaluation.judge import judge_verdict, parse_judge_scores
    >>> parse_judge_scores("Assistant 1: 8/10, Assistant 2: 7.5/10\\nAssistant 1 was more detailed.")
    (8.0, 7.5)
    >>> parse_judge_scores("Both answers are fine.") is None
    True
    >>> judge_verdict((8, 7), (6, 8))   # A first: A better; B first: A (second) better
    'win'
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping, Optional, Sequence

VERDICTS = ("win", "tie", "lose", "error")
SCORE_RANGE = (0.0, 10.0)
MAX_SCORE_LINES = 3  # how many non-empty leading lines may hold a bare score line

_NUM = r"(?<![\w.])-?\d+(?:\.\d+)?(?!\w|\.\d)"
_LABEL = r"assistant\s*(?:#\s*)?([12])\b"
# Words and marks allowed between a label and its score: "Assistant 1's overall score is: **8**".
_FILLER = (r"(?:\s|[:=\-\u2013\u2014*_()\[\]]|'s|\bscored?\b|\bscores\b|\brating\b|\boverall\b|\breceives\b|"
           r"\bgets\b|\bis\b|\bof\b|\ba\b|\ban\b)*?")
_LABELED = re.compile(_LABEL + _FILLER + "(" + _NUM + ")", re.IGNORECASE)
# A label that states a score ("Assistant 1: 8", "Assistant 1's score is 8"), not a verb
# ("Assistant 1 is 2 paragraphs long"): only after a verb is the next word checked.
_STATED = re.compile(r"[:=\-\u2013\u2014]|\bscore\b|\brating\b", re.IGNORECASE)
# The word after a number that is a count ("2 paragraphs", "2 points higher", "2 facts wrong").
_COUNTED = re.compile(r"\s*(?!(?:and|but|while|whereas|vs|versus|assistant)\b)[^\W\d_]", re.IGNORECASE)
_RANGE = re.compile(r"\s*(?:[-\u2013\u2014]|to\b)\s*\d", re.IGNORECASE)  # "7-8", "7 to 8": no one score
_OUT_OF = re.compile(r"\s*(?:/|out\s+of)\s*10(?:\.0+)?(?!\d)", re.IGNORECASE)
_MARKUP = re.compile(r"[*_`#>]")
# A score line, its two numbers taken out: separators only, after an optional lead-in such as
# "Scores:" or "The scores are" ("8 7", "8, 7", "[8, 7]", "Scores: 8.5 and 7", "8 vs. 7.").
_SEP = r"[\s,;:/|&()\[\]\-.]"
_SCORE_LINE_REST = re.compile(rf"(?:{_SEP}*(?:(?:the|my|final|overall)\s+)*(?:scores?|ratings?)(?:\s+(?:are|is))?)?"
                              rf"(?:{_SEP}|\band\b|\bvs\b)*", re.IGNORECASE)
# A numbered list item holding one score ("1. 8", "2) 7", "(1) 8", "1: 8"): its index is no score.
_ITEM = re.compile(rf"(?:\((?P<p>\d{{1,2}})\)|(?P<n>\d{{1,2}})[.):])[ \t]+(?P<score>{_NUM})[ \t.,;]*")


def _in_range(scores: Sequence[float]) -> Optional[tuple[float, float]]:
    low, high = SCORE_RANGE
    values = tuple(float(s) for s in scores)
    if len(values) == 2 and all(low <= v <= high for v in values):
        return values
    return None


def _item(line: str) -> Optional[tuple[int, str]]:
    """(index, score) of a numbered list item that holds one score, else None."""
    match = _ITEM.fullmatch(line)
    return (int(match["p"] or match["n"]), match["score"]) if match else None


def _pair(line: str) -> Optional[list[str]]:
    """The two numbers of a score line (two numbers and separators only), else None."""
    numbers = re.findall(_NUM, line)
    if len(numbers) == 2 and _SCORE_LINE_REST.fullmatch(re.sub(_NUM, " ", line)):
        return numbers
    return None


def _list_scores(item: tuple[int, str], following: list[str]) -> Optional[tuple[float, float]]:
    """The scores of a numbered list that starts with `item`: items 1 and 2 on consecutive lines
    and no third score item, else None (the index could be read as a score)."""
    second = _item(following[0]) if following else None
    third = _item(following[1]) if len(following) > 1 else None
    if item[0] == 1 and second is not None and second[0] == 2 and third is None:
        return _in_range((item[1], second[1]))
    return None


def parse_judge_scores(text: Optional[str]) -> Optional[tuple[float, float]]:
    """The (Assistant 1, Assistant 2) scores of a judge's answer, or `None` when unparseable.

    Rules, in order (scores must lie in [0, 10]; "/10" and "out of 10" are dropped first):

    1. The first of the first three non-empty lines (markdown marks removed) that is a score
       line, as the prompt asks for: two numbers and nothing else but separators (spaces,
       commas, "/", "and", "vs") after an optional "Scores:" or "The scores are": "8 7",
       "8, 7", "Scores: 8.5 and 7", "**Scores**\\n8 7" (the reference split the first line on
       spaces after replacing commas). Prose with two numbers in it is no score line:
       "1 and 2 are both fine" is unparseable.
    2. A numbered list is read by its items, never by its index (the reference's split of the
       first line reads "1. 8" as the pair (1, 8): a flipped verdict). A line that is an index ("1.", "1)", "(1)", "1:")
       and one score, where the score line would be, is item 1 and the next line item 2:
       "1. 8\\n2. 7" gives (8, 7). Any other numbering is `None`: an item alone ("1) 8"), a first
       item that is not 1 ("8. 7", "2. 8\\n3. 7"), a third score item ("3. 9"), and a score line
       numbered like a list ("1 8\\n2 7": the pair (1, 8) or the items 8 and 7).
    3. Only when there is no score line, labelled scores anywhere: "Assistant 1: 8" ...
       "Assistant 2 receives a score of 7". Numbers the explanation puts after a label
       ("Assistant 1 is 3 sentences long") never override the score line; after a verb, a
       number followed by a word is a count, no score ("Assistant 1 is 2 paragraphs long");
       two different scores for one assistant, or a range ("Assistant 1: 7-8"), are `None`.

    Example:
        >>> from reflectune_hf.evaluation.judge import parse_judge_scores
        >>> parse_judge_scores("8, 7\\nAssistant 1 gave more detail.")
        (8.0, 7.0)
        >>> parse_judge_scores("6 9\\nAssistant 1 is 3 sentences long and Assistant 2 is 1 sentence long.")
        (6.0, 9.0)
        >>> parse_judge_scores("Assistant 1 lists 3 tips while Assistant 2 lists 5.") is None
        True
        >>> parse_judge_scores("1. 8\\n2. 7"), parse_judge_scores("1) 8\\nAssistant 1 is better.")
        ((8.0, 7.0), None)
    """
    if not isinstance(text, str) or not text.strip():
        return None
    clean = _OUT_OF.sub("", text)
    lines = [_MARKUP.sub("", line).strip() for line in clean.splitlines()]
    filled = [line for line in lines if line]
    for i, line in enumerate(filled[:MAX_SCORE_LINES]):
        following = filled[i + 1:i + 3]
        item = _item(line)
        if item is not None:  # "1. 8": a list's index and one score, never the pair (1, 8)
            return _list_scores(item, following)
        numbers = _pair(line)
        if numbers is not None:
            after = _pair(following[0]) if following else None
            if float(numbers[0]) == 1 and after is not None and float(after[0]) == 2:
                return None  # "1 8\n2 7": the pair (1, 8) or a list's items 8 and 7
            return _in_range(numbers)
    found: dict[str, set[float]] = {}
    for match in _LABELED.finditer(clean):
        stated = _STATED.search(clean, match.end(1), match.start(2))
        if _RANGE.match(clean, match.end()):
            found.setdefault(match.group(1), set()).add(math.nan)  # unreadable, as two values are
        elif stated or not _COUNTED.match(clean, match.end()):
            found.setdefault(match.group(1), set()).add(float(match.group(2)))
    if len(found) == 2 and all(len(values) == 1 for values in found.values()):
        return _in_range((*found["1"], *found["2"]))
    return None  # one label, two values for one, or a range: the verdict could be flipped


def _a_better(scores_ab: Sequence[float], scores_ba: Sequence[float]) -> tuple[int, int]:
    """Per order, +1 when A scored higher, 0 tied, -1 lower (scores_ba lists B's score first)."""
    def sign(x: float) -> int:
        return (x > 0) - (x < 0)

    return sign(scores_ab[0] - scores_ab[1]), sign(scores_ba[1] - scores_ba[0])


def _valid(scores) -> bool:
    if scores is None or len(scores) != 2:
        return False
    return all(s is not None and not (isinstance(s, float) and math.isnan(s)) for s in scores)


def judge_verdict(scores_ab: Optional[Sequence[float]], scores_ba: Optional[Sequence[float]]) -> str:
    """The verdict for model A against model B from the judge's scores in both orders.

    Args:
        scores_ab: (Assistant 1, Assistant 2) scores with A's answer shown first: (A, B).
        scores_ba: (Assistant 1, Assistant 2) scores with B's answer shown first: (B, A).

    Returns:
        `"win"` when A is better in both orders, or better in one and tied in the other;
        `"lose"` symmetrically; `"tie"` when tied in both or when the orders disagree;
        `"error"` when either order has no scores (None or NaN), so it is never counted as a
        result (REFERENCE.md §11).

    Example:
        >>> from reflectune_hf.evaluation.judge import judge_verdict
        >>> judge_verdict((7, 7), (6, 8)), judge_verdict((8, 7), (8, 7)), judge_verdict((8, 7), None)
        ('win', 'tie', 'error')
    """
    if not (_valid(scores_ab) and _valid(scores_ba)):
        return "error"
    first, second = _a_better(scores_ab, scores_ba)
    total = first + second
    if first * second < 0 or total == 0:
        return "tie"
    return "win" if total > 0 else "lose"


def judge_summary(ds, column: str = "verdict") -> dict:
    """Counts of a judged dataset's verdicts and the papers' win score.

    Args:
        ds: a Dataset (or any mapping / sequence of verdicts under `column`) from `PairwiseJudge`.

    Returns:
        `{"rows", "wins", "ties", "losses", "errors", "judged", "win_score", "win_rate",
        "tie_rate", "lose_rate"}`: `judged` = wins + ties + losses (errors are left out of it and
        of every rate), `win_score` = (wins - losses) / judged + 1 (1.0 is parity, 2.0 all wins),
        None when nothing was judged. Raises `ValueError` on a verdict outside
        {win, tie, lose, error}.

    Example:
        >>> from reflectune_hf.evaluation.judge import judge_summary
        >>> s = judge_summary({"verdict": ["win", "win", "tie", "lose", "error"]})
        >>> s["wins"], s["errors"], s["judged"], s["win_score"]
        (2, 1, 4, 1.25)
    """
    verdicts = list(ds[column]) if not isinstance(ds, (list, tuple)) else list(ds)
    unknown = sorted({str(v) for v in verdicts} - set(VERDICTS))
    if unknown:
        raise ValueError(f"judge_summary: column {column!r} holds verdicts {unknown} outside {VERDICTS}")
    counts = {v: verdicts.count(v) for v in VERDICTS}
    judged = counts["win"] + counts["tie"] + counts["lose"]
    summary = {"rows": len(verdicts), "wins": counts["win"], "ties": counts["tie"], "losses": counts["lose"],
               "errors": counts["error"], "judged": judged}
    rate = (lambda n: n / judged) if judged else (lambda n: None)
    summary["win_score"] = (counts["win"] - counts["lose"]) / judged + 1 if judged else None
    summary.update(win_rate=rate(counts["win"]), tie_rate=rate(counts["tie"]), lose_rate=rate(counts["lose"]))
    return summary


def format_judge_table(summary_by_testset: Mapping[str, Mapping]) -> str:
    """A plain-text table of summaries, one row per test set (what `reflectune eval` prints)."""
    header = f"{'test set':<16}{'win':>6}{'tie':>6}{'lose':>6}{'error':>7}{'win score':>11}"
    rows = [header, "-" * len(header)]
    for name, s in summary_by_testset.items():
        score = "n/a" if s["win_score"] is None else f"{s['win_score']:.3f}"
        rows.append(f"{name:<16}{s['wins']:>6}{s['ties']:>6}{s['losses']:>6}{s['errors']:>7}{score:>11}")
    return "\n".join(rows)


COLORS = {"win": "#4c9a5b", "tie": "#c9c9c9", "lose": "#d0605e"}


def plot_judge(summary_by_testset: Mapping[str, Mapping], path, title: str = "A vs B",
               labels: tuple[str, str] = ("A", "B")) -> Path:
    """The papers' chart: one horizontal bar per test set, stacked win / tie / lose (PNG).

    Shares are of the judged rows (errors excluded); each bar is labelled with its counts, and
    the test set's name carries its error count and win score.

    Args:
        summary_by_testset: `{test set name: judge_summary(...)}` (a single summary is drawn as
            one bar named "all").
        path: the PNG to write (parent directories are created).
        title: the chart's title; labels: the names of model A and model B for the legend.

    Example:
        >>> import tempfile, os
        >>> from reflectune_hf.evaluation.judge import judge_summary, plot_judge
        >>> s = judge_summary({"verdict": ["win", "tie", "lose", "win"]})
        >>> os.path.getsize(plot_judge({"vicuna": s}, os.path.join(tempfile.mkdtemp(), "j.png"))) > 0
        True
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if "wins" in summary_by_testset:
        summary_by_testset = {"all": summary_by_testset}
    if not summary_by_testset:
        raise ValueError("plot_judge needs at least one summary")
    names = list(summary_by_testset)
    fig = Figure(figsize=(9, 0.55 * len(names) + 1.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    legend = {"win": f"{labels[0]} wins", "tie": "tie", "lose": f"{labels[1]} wins"}
    for y, name in enumerate(names):
        s = summary_by_testset[name]
        left = 0.0
        for key, count in (("win", s["wins"]), ("tie", s["ties"]), ("lose", s["losses"])):
            share = count / s["judged"] if s["judged"] else 0.0
            ax.barh(y, share, left=left, color=COLORS[key], edgecolor="white",
                    label=legend[key] if y == 0 else None)
            if share >= 0.06:
                ax.text(left + share / 2, y, str(count), ha="center", va="center", fontsize=9)
            left += share
        if not s["judged"]:
            ax.text(0.5, y, "nothing judged", ha="center", va="center", color="gray", fontsize=9)
    ticks = []
    for name in names:
        s = summary_by_testset[name]
        score = "n/a" if s["win_score"] is None else f"{s['win_score']:.2f}"
        ticks.append(f"{name}\nwin score {score}, {s['errors']} err")
    ax.set_yticks(range(len(names)), ticks, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of judged rows (errors excluded)")
    ax.set_title(title)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.08), ncol=3, fontsize=9, frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
