"""The reference IFD / r-IFD algorithm, one row at a time: the oracle and the baseline.

This is a plain re-statement of the method's published scoring script
(`selection_code/data_analysis.py` of Reflection-Tuning, REFERENCE.md §6): batch size 1, four
forward passes per row through the *whole* causal LM, the loss taken from the model's own
`labels=` path. It exists for two jobs only, and is kept deliberately naive so that it can serve
as an independent check of `reflectune_hf.scoring.ifd.IFDScorer`:

- the parity tests compare the fast scorer with it on the bundled sample;
- `scripts/bench_ifd.py` times it as the baseline.

It differs from the published script in two ways: where the script turns an exception into a
score of 0 (which then passes `< 1` filters), this returns NaN; and the r-IFD target is the
whole `instruction + input` (the script searches the last occurrence of the instruction alone,
which an input that repeats it, or an empty instruction, moves; other rows are unchanged). Use
`IFDScorer` for real work.

Example:
    >>> from reflectune_hf.models import load_causal_lm
    >>> from reflectune_hf.scoring.reference import reference_losses
    >>> model, tok = load_causal_lm("smollm2-135m-instruct", device="cpu")
    >>> losses = reference_losses(model, tok, "Say hi.", "", "Hi!")
    >>> len(losses)
    4
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from ..prompts import NO_SEPARATOR, get_scoring_template, join_input, reverse_prompt

LOSS_ORDER = ("ins_alone", "out_alone", "ins_condition", "out_condition")  # the reference's order


def _encode(tokenizer, text: str, max_length: int):
    import torch

    ids = tokenizer.encode(text, truncation=True, max_length=max_length)
    return torch.tensor([ids], dtype=torch.long)


def _whole_text_loss(model, tokenizer, text: str, max_length: int) -> float:
    """Mean loss over every token of `text` but the first (labels = inputs, the model shifts)."""
    import torch

    try:
        input_ids = _encode(tokenizer, text, max_length).to(model.device)
        with torch.no_grad():
            return float(model(input_ids, labels=input_ids.clone()).loss)
    except Exception:  # the published script returns 0 here; NaN is the honest value
        return math.nan


def _part_text_loss(model, tokenizer, text: str, target: str, max_length: int) -> float:
    """Mean loss over the tokens of `text` from the last occurrence of `target` on.

    The boundary is the token count of the untruncated text before `target`, tokenized alone.
    """
    import torch

    try:
        input_ids = _encode(tokenizer, text, max_length).to(model.device)
        boundary = len(tokenizer.encode(text[: text.rfind(target)]))
        labels = input_ids.clone()
        labels[0, :boundary] = -100
        with torch.no_grad():
            return float(model(input_ids, labels=labels).loss)
    except Exception:
        return math.nan


def reference_losses(
    model, tokenizer, instruction: str, input: str, output: str, template: str = "vicuna", max_length: int = 2048
) -> list[float]:
    """The four losses of one row, `[ins_alone, out_alone, ins_condition, out_condition]`.

    An empty `output` gives four NaN (the published script writes an empty record).
    """
    if output == "":
        return [math.nan] * 4
    tmpl = get_scoring_template(template)
    prompt = tmpl.format(instruction, input)
    prompt_len = len(tokenizer.encode(prompt, truncation=True, max_length=max_length))
    reverse = tmpl.no_input.format(instruction=reverse_prompt(output))
    reverse_len = len(tokenizer.encode(reverse, truncation=True, max_length=max_length))
    ins = join_input(instruction, input, NO_SEPARATOR)
    return [
        _whole_text_loss(model, tokenizer, ins, max_length - reverse_len + 1),
        _whole_text_loss(model, tokenizer, output, max_length - prompt_len + 1),
        _part_text_loss(model, tokenizer, reverse + ins, ins, max_length),
        _part_text_loss(model, tokenizer, prompt + output, output, max_length),
    ]


def reference_scores(
    model, tokenizer, rows: Sequence[Mapping], template: str = "vicuna", max_length: int = 2048
) -> list[list[float]]:
    """`reference_losses` for each row (dicts with `instruction`, `output`, optional `input`)."""
    return [
        reference_losses(
            model, tokenizer, row["instruction"] or "", row.get("input") or "", row["output"] or "", template, max_length
        )
        for row in rows
    ]
