"""Extraction of reflected pairs: a corpus of raw oracle outputs we wrote, with expected results.

tests/data/extraction_cases.jsonl holds one case per line: `stage` (instruction / response /
compress), `covers` (what the case exercises; `ref:*` marks a reference bug of REFERENCE.md §5),
the `raw` oracle text, `error`, the previous pair and the expected pair and status.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from datasets import Dataset

from reflectune_hf.data import ColumnError
from reflectune_hf.reflection.extract import (
    STATUSES,
    extract_instruction_reflection,
    extract_response_reflection,
    is_usable,
    parse_compressed_instruction,
    parse_instruction_reflection,
    parse_response_reflection,
    segments,
)

CASES_FILE = Path(__file__).parent / "data" / "extraction_cases.jsonl"
CASES = [json.loads(line) for line in CASES_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
EXTRACT = {"instruction": extract_instruction_reflection, "response": extract_response_reflection}


def _batch(cases):
    return {
        "id": list(range(len(cases))),
        "instruction": [c["instruction"] for c in cases],
        "output": [c["output"] for c in cases],
        "reflection_raw": [c["raw"] for c in cases],
        "reflection_error": [c["error"] for c in cases],
        "reflection_finish_reason": [c.get("finish_reason", "stop") for c in cases],
    }


def test_corpus_covers_every_case_of_the_issue_and_each_reference_bug():
    tags = Counter(tag for case in CASES for tag in case["covers"])
    reflection_cases = [c for c in CASES if c["stage"] != "compress"]
    assert len(reflection_cases) >= 40 and len({c["name"] for c in CASES}) == len(CASES)
    required = {
        "ref:na", "ref:bare_end", "ref:tail_3", "ref:placeholder_contains", "markdown", "colon", "missing_end",
        "several_segments", "refusal", "code", "placeholder", "oracle_error", "no_format", "missing_part",
        "loose_marker_inside_bracketed", "mixed_markers", "real_value_answer",
    }
    assert required <= set(tags), required - set(tags)
    statuses = {c["expected_status"] for c in reflection_cases}
    assert statuses == set(STATUSES)


@pytest.mark.parametrize("case", [c for c in CASES if c["stage"] != "compress"], ids=lambda c: c["name"])
def test_extraction_case(case):
    out = EXTRACT[case["stage"]](_batch([case]))
    assert out["reflection_status"] == [case["expected_status"]]
    assert out["output"] == [case["expected_output"]]
    assert out.get("instruction", [case["instruction"]]) == [case["expected_instruction"]]


@pytest.mark.parametrize("case", [c for c in CASES if c["stage"] == "compress"], ids=lambda c: c["name"])
def test_compression_case(case):
    assert parse_compressed_instruction(case["raw"]) == case["expected_instruction"]


@pytest.mark.parametrize("stage", ["instruction", "response"])
def test_whole_corpus_through_dataset_map(stage):
    # Arrow holds no lone surrogate: the invalid_text cases run on Python batches only.
    cases = [c for c in CASES if c["stage"] == stage and "invalid_text" not in c["covers"]]
    ds = Dataset.from_dict({**_batch(cases), "input": [""] * len(cases)})
    out = ds.map(EXTRACT[stage], batched=True, batch_size=7)
    assert len(out) == len(ds) and list(out["id"]) == list(ds["id"])
    assert list(out["reflection_raw"]) == list(ds["reflection_raw"])
    assert list(out["reflection_status"]) == [c["expected_status"] for c in cases]
    assert list(out["output"]) == [c["expected_output"] for c in cases]
    assert list(out["instruction"]) == [c["expected_instruction"] for c in cases]


def test_reference_bugs_are_fixed():
    # The reference drops an answer that contains "N/A", cuts at any word starting with "End",
    # and rejects fields that contain "your answer": each input now gives the real text.
    assert parse_instruction_reflection("[New Instruction] A [End] [New Answer] Write N/A if unknown. [End]") == (
        "A", "Write N/A if unknown.")
    assert segments("[Better Answer] Endangered animals [End]", "better") == ["Endangered animals"]
    assert segments("[Better Answer] see the End of it. [End]", "better") == ["see the End of it."]
    assert is_usable("Compare your answer with the key.") and not is_usable("your answer")
    # "\n\n3." before the answer is not part of the instruction
    assert parse_instruction_reflection("[New Instruction] Do X.\n\n3. [New Answer] Y")[0] == "Do X."


def test_only_true_placeholders_fall_back():
    # Values such as None / Nothing / N/A are real answers (print() returns None); the format's
    # own placeholders and empty fields are not.
    for value in ("None", "Nothing", "N/A", "null", "NULL.", "TBD", "Not applicable"):
        assert is_usable(value), value
    for placeholder in ("", "  ", "your answer", "Your instruction.", "<insert your new answer here>", "[your answer]",
                        "Better Answer", "the instruction"):
        assert not is_usable(placeholder), placeholder


def test_loose_label_inside_a_bracketed_segment_is_text():
    raw = "[Better Answer] Label the column 'New Answer:' and fill it. [End]"
    assert segments(raw, "better") == ["Label the column 'New Answer:' and fill it."] and segments(raw, "answer") == []
    # A loose marker opening a line still ends a bracketed segment (mixed formats).
    assert parse_instruction_reflection("[New Instruction] Do X.\nNew Answer: Y") == ("Do X.", "Y")
    assert parse_instruction_reflection("[New Instruction] Do X.\n- **New Answer:** Y") == ("Do X.", "Y")
    # Outside any bracketed segment, loose markers keep ending each other within one line.
    assert parse_instruction_reflection("New Instruction: Do X. New Answer: Y") == ("Do X.", "Y")


# (oracle text, better answer): `**` and enumerator lines that belong to the answer are kept.
CONTENT_KEPT = [
    ("[Better Answer] **kwargs collects extra keyword arguments into a dict. [End]",
     "**kwargs collects extra keyword arguments into a dict."),
    ("[Better Answer] **Note:** in Python, 2**3 equals 8. [End]", "**Note:** in Python, 2**3 equals 8."),
    ("[Better Answer] In Python, exponentiation is written with ** [End]",
     "In Python, exponentiation is written with **"),
    ("[Better Answer] ** is the power operator. [End]", "** is the power operator."),
    ("[Better Answer] The answer is **42**[End]", "The answer is **42**"),
    ("[Better Answer] The sum of 5 and 7 is:\n12. [End]", "The sum of 5 and 7 is:\n12."),
    ("[Better Answer] Steps:\n1. Mix.\n2.", "Steps:\n1. Mix.\n2."),  # no [End]: the last line is still text
]
# (oracle text, better answer): `**` glued to a marker and an enumerator cut by the next marker are not.
DECORATION_CUT = [
    ("[Better Answer] Robin**[End]**", "Robin"),
    ("[Better Answer] Robin**[End]", "Robin"),
    ("[Better Answer]** Robin. [End]", "Robin."),
    ("**[Better Answer]:**Robin. [End]", "Robin."),
    ("**Better Answer:**Robin.", "Robin."),
    ("[Better Answer]**\n\n**Step 1:** Mix. [End]", "**Step 1:** Mix."),
    ("[Better Answer] **Robin** is a bird.**[End]**", "**Robin** is a bird."),
    ("1. Too short.\n2. [Better Answer] Robin.\n\n3. [Better Answer] Robin.", "Robin."),
]


_IDS = [f"kept{i}" for i in range(len(CONTENT_KEPT))] + [f"cut{i}" for i in range(len(DECORATION_CUT))]


@pytest.mark.parametrize("raw,expected", CONTENT_KEPT + DECORATION_CUT, ids=_IDS)
def test_markdown_and_enumerators_of_the_answer_are_kept(raw, expected):
    assert parse_response_reflection(raw) == expected
    out = extract_response_reflection({"instruction": ["Q"], "output": ["A"], "reflection_raw": [raw]})
    assert out == {"output": [expected], "reflection_status": ["ok"]}


def test_enumerator_tail_of_the_instruction():
    # The reference cuts the new instruction's trailing "\n\n3." (the prompt's step 3) whatever ends it;
    # any other enumerator line is cut only when the next marker follows it on its line.
    assert parse_instruction_reflection("[New Instruction] Do X.\n\n3.\n[New Answer] Y [End]") == ("Do X.", "Y")
    assert parse_instruction_reflection("[New Instruction] Do X.\n\n3. [End] [New Answer] Y") == ("Do X.", "Y")
    assert parse_instruction_reflection("[New Instruction] Do X.\n**2)** [New Answer] Y") == ("Do X.", "Y")
    assert parse_instruction_reflection("[New Instruction] Rank:\n1. a\n2. [End] [New Answer] Y") == (
        "Rank:\n1. a\n2.", "Y")


def test_segments_ignore_markers_inside_code_and_reject_unknown_labels():
    text = "[Better Answer] Use `[End]` as a sentinel:\n```\nwhile tok != \"[End]\": pass\n```\n[End]"
    assert segments(text, "better") == ['Use `[End]` as a sentinel:\n```\nwhile tok != "[End]": pass\n```']
    with pytest.raises(ValueError, match="better"):
        segments(text, "best")


def test_a_longer_fence_holds_a_shorter_one_with_its_markers():
    """A ```` fence that shows a ``` block (an answer about Markdown) closed at the inner ```, so
    the [End] inside the example cut the answer to "````md\n```" with status ok."""
    answer = "````md\n```\n[End]\n```\n````\nDone."
    assert parse_response_reflection(f"1. Too short.\n2. [Better Answer]\n{answer} [End]") == answer
    raw = f"[New Instruction] Show a fenced block. [End]\n[New Answer] {answer} [End]"
    assert parse_instruction_reflection(raw) == ("Show a fenced block.", answer)
    tildes = "~~~~\n~~~\n[End]\n~~~\n~~~~"
    assert parse_response_reflection(f"[Better Answer]\n{tildes} [End]") == tildes


def test_a_closing_tag_ends_a_segment_and_never_leaks_into_it():
    """An oracle that closes a field like a tag ("[/New Instruction]") got the tag kept as text:
    the compressed instruction "Translate 'Good morning' to French. [/New Instruction]" was ok."""
    compressed = "[New Instruction] Translate 'Good morning' to French. [/New Instruction]"
    assert parse_compressed_instruction(compressed) == "Translate 'Good morning' to French."
    assert parse_instruction_reflection("[New Instruction] Name a bird. [/New Instruction]\n"
                                        "[New Answer] Robin. [/New Answer]") == ("Name a bird.", "Robin.")
    assert parse_response_reflection("2. [Better Answer] Robin. [ / Better Answer]\nHope it helps.") == "Robin."
    assert parse_response_reflection("[Better Answer] Use [b]bold[/b] tags. [/End]") == "Use [b]bold[/b] tags."


def test_missing_columns_name_the_stage_to_run_first():
    with pytest.raises(ColumnError, match=r"run ReflectInstruction first.*\['reflection_raw'\]"):
        extract_instruction_reflection({"instruction": ["a"], "output": ["b"]})
    with pytest.raises(ColumnError, match="run ReflectResponse first"):
        extract_response_reflection({"instruction": ["a"], "reflection_raw": ["b"]})
    with pytest.raises(ColumnError, match="must hold strings"):
        extract_response_reflection({"instruction": ["a"], "output": ["b"], "reflection_raw": [3]})


def test_none_values_read_as_empty():
    out = extract_response_reflection(
        {"instruction": [None], "output": [None], "reflection_raw": [None], "reflection_error": [None]}
    )
    assert out == {"output": [""], "reflection_status": ["empty_input"]}  # nothing was sent for it


def test_a_row_with_thousands_of_markers_extracts_every_segment():
    # Issue #16.9c: markers, `[End]`s and spans are looked up by binary search over sorted
    # positions (no rescan per marker), so the work grows linearly with the markers: 8,000
    # markers take ~0.2 s here (~3 s before; the issue measured 11.5 s on its row).
    n = 2000
    bracketed = "\n".join(f"[New Instruction] Step {i}. [End] [New Answer] Answer {i}: label 'New Answer: x' here. [End]"
                          for i in range(n))
    assert segments(bracketed, "instruction") == [f"Step {i}." for i in range(n)]
    assert segments(bracketed, "answer") == [f"Answer {i}: label 'New Answer: x' here." for i in range(n)]
    loose = " ".join(f"New Instruction: do {i}. New Answer: done {i}." for i in range(2 * n))
    assert segments(loose, "answer") == [f"done {i}." for i in range(2 * n)]
    assert parse_instruction_reflection(bracketed) == ("Step 0.", "Answer 0: label 'New Answer: x' here.")
