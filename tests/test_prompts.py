"""Prompt parity: the method's strings, byte for byte (REFERENCE.md §3, §4, §6, §9, §11)."""

from __future__ import annotations

import hashlib
import re

import pytest

from reflectune_hf import prompts
from reflectune_hf.prompts import get_prompt_set, get_scoring_template, reverse_prompt

from conftest import SHARED

REFERENCE = SHARED / "REFERENCE.md"


def _reference_text() -> str:
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} is absent (a fresh clone has no ../shared)")
    return REFERENCE.read_text(encoding="utf-8")


def _section(text: str, number: int) -> str:
    start = text.index(f"\n## {number}. ")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def _python_blocks(section: str) -> list[dict]:
    """Execute each ``` block of a section as Python and return its variables."""
    out = []
    for block in re.findall(r"```(?:\w*)\n(.*?)```", section, flags=re.S):
        scope: dict = {}
        exec(block, {}, scope)
        out.append(scope)
    return out


def _systems(section: str) -> list[str]:
    return re.findall(r"System:\s*`([^`]+)`", section.replace("\n", " "))


def test_reflection_prompts_equal_reference():
    text = _reference_text()
    paper = get_prompt_set("paper")
    (ins,) = _python_blocks(_section(text, 3))
    assert _systems(_section(text, 3)) == [paper.instruction_system]
    assert paper.instruction_template == ins["template"]
    assert paper.instruction_criteria == ins["CRITERIA_INS"]
    res, res_input = _python_blocks(_section(text, 4))
    assert _systems(_section(text, 4)) == [paper.response_system, paper.response_input_system]
    assert paper.response_template == res["template"] and paper.response_criteria == res["CRITERIA_RES"]
    assert paper.response_input_template == res_input["template"]
    assert paper.response_input_criteria == res_input["CRITERIA_RES_INPUT"]

    # The stage messages are exactly template.format(...) with the reference's keywords.
    messages = paper.instruction_messages("Do X.", "Done.")
    assert messages == [
        {"role": "system", "content": _systems(_section(text, 3))[0]},
        {"role": "user", "content": ins["template"].format(ins="Do X.", outp="Done.", criteria=ins["CRITERIA_INS"])},
    ]
    messages = paper.response_messages("Do X.", "Done.", input="with this")
    assert messages[1]["content"] == res_input["template"].format(
        ins="Do X.", inp="with this", outp="Done.", criteria=res_input["CRITERIA_RES_INPUT"]
    )


def test_scoring_templates_equal_reference():
    section = _section(_reference_text(), 6)
    assigned = dict(re.findall(r'(\w+_(?:NO_)?INPUT)\s*=\s*("(?:[^"\\]|\\.)*")', section))
    for name in ("vicuna", "alpaca", "wizardlm"):
        template = get_scoring_template(name)
        # placeholders as values render each form as the reference's template text
        assert template.format("{instruction}") == eval(assigned[f"{name.upper()}_NO_INPUT"])
        assert template.format("{instruction}", "{input}") == eval(assigned[f"{name.upper()}_INPUT"])
    reverse = re.search(r'REVERSE = (".*?") \+ output \+ (".*?")\n', section)
    assert reverse_prompt("OUT") == eval(reverse.group(1)) + "OUT" + eval(reverse.group(2))


def test_selectit_and_judge_prompts_equal_reference():
    text = _reference_text()
    lines = re.search(r"The nine rating lines:\n\n```\n(.*?)```", _section(text, 9), flags=re.S).group(1)
    assert list(prompts.SELECTIT_RATING_LINES) == lines.strip("\n").split("\n")
    (judge,) = _python_blocks(_section(text, 11))
    assert prompts.JUDGE_TEMPLATE == judge["template"] and prompts.JUDGE_CRITERIA == judge["criteria"]
    assert _systems(_section(text, 11))[0] == prompts.JUDGE_SYSTEM


# Always-run guard (fresh clones have no REFERENCE.md): digests of the paper strings as verified
# against REFERENCE.md by the tests above.
PAPER_DIGEST = "133200a03bb43b4c"


def _paper_digest() -> str:
    p = get_prompt_set("paper")
    parts = [
        p.instruction_system, p.instruction_template, p.instruction_criteria, p.response_system,
        p.response_template, p.response_criteria, p.response_input_system, p.response_input_template,
        p.response_input_criteria, *prompts.SELECTIT_RATING_LINES, prompts.JUDGE_SYSTEM,
        prompts.JUDGE_TEMPLATE, prompts.JUDGE_CRITERIA, reverse_prompt("{output}"),
        *(t.format("{instruction}") + t.format("{instruction}", "{input}") for t in prompts.SCORING_TEMPLATES.values()),
    ]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def test_paper_prompts_unchanged():
    assert _paper_digest() == PAPER_DIGEST


def test_clean_set_fixes_typos_only_in_the_clean_set():
    clean, paper = get_prompt_set("clean"), get_prompt_set("paper")
    assert "relevent" in paper.instruction_criteria and "relevent" not in clean.instruction_criteria
    assert clean.response_criteria == paper.response_criteria
    with pytest.raises(ValueError, match="paper"):
        get_prompt_set("nope")


def test_templates_with_braces_in_data_are_safe():
    messages = get_prompt_set().response_messages("Format {x} as JSON", "{\"x\": 1}")
    assert "Format {x} as JSON" in messages[1]["content"] and '{"x": 1}' in messages[1]["content"]
    assert get_scoring_template("plain").format("Do {y}", "in {z}") == "Do {y}\nin {z}\n"


# -- the instruction+input join: one function, byte-identical at every use (issue #19.2) ---------

JOIN_CASES = [("Sort these:", "3, 1, 2"), ("Say hi.", ""), ("  Pad ", " in \n")]


def test_scoring_templates_join_input_as_before():
    """Each template's output equals the literal two-form template it replaced."""
    from reflectune_hf.prompts import VICUNA_SYSTEM

    before = {
        "vicuna": (VICUNA_SYSTEM + " USER: {instruction} ASSISTANT:",
                   VICUNA_SYSTEM + " USER: {instruction}\nInput:\n{input} ASSISTANT:"),
        "wizardlm": ("{instruction}\n\n### Response:", "{instruction}\n{input}\n\n### Response:"),
        "plain": ("{instruction}\n", "{instruction}\n{input}\n"),
        "alpaca": (
            "Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{instruction}\n\n### Response:",
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"),
    }
    for name, (no_input, with_input) in before.items():
        for instruction, input in JOIN_CASES + [("Use {braces}", "{x}")]:
            expected = (with_input.format(instruction=instruction, input=input) if input
                        else no_input.format(instruction=instruction))
            assert get_scoring_template(name).format(instruction, input) == expected, (name, instruction, input)


def test_every_join_site_gives_todays_bytes():
    from reflectune_hf.evaluation.quality import _pair_texts
    from reflectune_hf.evaluation.stages import GenerateResponses
    from reflectune_hf.prompts import merge_input
    from reflectune_hf.scoring.ifd import _row_texts
    from reflectune_hf.scoring.selectit import rating_prompts_for
    from reflectune_hf.training.sft import to_messages
    from reflectune_hf.tuna.stages import format_prompt
    from datasets import Dataset

    class Nothing:
        def complete(self, requests):
            return []

    for ins, inp in JOIN_CASES:
        # merge (reflection): stripped at the join, blank input -> the instruction unchanged
        assert merge_input(ins, inp) == (f"{ins.rstrip()}\n\n{inp.strip()}" if inp.strip() else ins)
        # Tuna's bare prompt: a blank line, a blank input is none
        assert format_prompt(ins, inp, None) == (f"{ins}\n\n{inp}" if inp.strip() else ins)
        # a test question: a blank line
        request = GenerateResponses(Nothing()).request(ins, inp)
        assert request.message_dicts[-1]["content"] == (f"{ins}\n\n{inp}" if inp else ins)
        # SFT user turn: the Vicuna separator
        user = to_messages({"instruction": ins, "input": inp, "output": "o"})["messages"][0]["content"]
        assert user == (f"{ins}\nInput:\n{inp}" if inp else ins)
        # quality report and SelectIT: a newline
        assert rating_prompts_for(ins, inp, "o", ["R"])[0].startswith(f"R\nInstruction:{ins}\n{inp}\n" if inp else f"R\nInstruction:{ins}\nResponse")
        texts, _ = _pair_texts(Dataset.from_dict({"instruction": [ins], "input": [inp], "output": ["o"]}))
        assert texts == [f"{ins}\n{inp}" if inp else ins]
        # IFD's instruction text: plain concatenation, as the reference script
        assert _row_texts(ins, inp, "out", get_scoring_template("vicuna"))["ins"] == ins + inp
    assert merge_input("   ", " x ") == "x"


def test_no_join_written_twice():
    """The instruction+input separators are written in prompts.py only."""
    import re
    from pathlib import Path

    import reflectune_hf

    root = Path(reflectune_hf.__file__).parent
    pattern = re.compile(r'f"\{[^}]*\}(\\n)+(Input:\\n)?\{[^}]*\}" if \w*\b|\+ input\b(?!`)|\\nInput:\\n')
    found = [str(p.relative_to(root)) for p in root.rglob("*.py")
             if p.name != "prompts.py" and pattern.search(p.read_text())]
    assert found == []
