"""The whole selection chain on the bundled sample with the real student model:
build_variants -> IFDScorer (SmolLM2-135M, CPU) -> select_v2 / explain_v2 -> summarize -> PNG plots.

The oracle here answers every request in format from the row it is asked about (a deterministic
rewrite of the row's own text), so all four variants hold real, distinct texts for the student
to score; tests/test_cli.py runs the same chain with the llama.cpp server as the oracle.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import matplotlib.image
import numpy as np
import pytest
from datasets import DatasetDict

from reflectune_hf.publishing.report import plot_summary, summarize
from reflectune_hf.scoring.ifd import IFDScorer
from reflectune_hf.selection.select import V2_SOURCES, explain_v2, select_v2
from reflectune_hf.reflection.variants import VARIANT_SPLITS, build_variants

from scripted_oracle import ScriptedOracle

# The compression prompt (reflectune_hf.prompts.COMPRESS_TEMPLATE) and the reflection prompts.
COMPRESS = re.compile(r"\[Instruction\]\n(?P<ins>.*?)\n\n\[The Start of Input\]\n(?P<inp>.*?)\n\n\[The End of Input\]",
                      re.S)
PAIR = re.compile(r"\[Instruction\]\n(?P<ins>.*?)\n\n(?:\[The Start of Input\]\n(?P<inp>.*?)\n\n\[The End of Input\]\n\n)?"
                  r"\[The Start of Answer\]\n(?P<out>.*?)\n\n\[The End of Answer\]", re.S)


@dataclass
class RewritingOracle(ScriptedOracle):
    """Answers in the method's formats with a rewrite of the row it is asked about."""

    model: str = "rewriting"

    def answer(self, request) -> str:
        system, user = request.message_dicts[0]["content"], request.message_dicts[-1]["content"]
        if "careful editor" in system:  # one self-contained instruction that quotes the input
            task = COMPRESS.search(user)
            return f"[New Instruction] {task['ins'].rstrip()} Work on this input:\n\n{task['inp']} [End]"
        pair = PAIR.search(user)
        ins, out = pair["ins"], pair["out"]
        if "quality of a given instruction" in system:
            return (f"1. Vague.\n2. [New Instruction] {ins} Explain your reasoning step by step. [End]\n"
                    f"3. [New Answer] {out} Each step follows from the previous one. [End]")
        return f"1. Too short.\n2. [Better Answer] In short: {out} In more detail, {out.lower()} [End]"


# The first 12 sample rows: 4 with an input to compress, weak and good rows, every task kind. The
# student scores 4 x 12 texts; the whole 40-row sample (160) added time, not coverage.
ROWS = 12


@pytest.mark.slow
def test_sample_variants_scores_select_v2_and_plots(sample, tmp_path):
    sample = sample.select(range(ROWS))
    variants = build_variants(sample, RewritingOracle(), batch_size=16)
    assert set(variants) == set(VARIANT_SPLITS) and all(len(v) == ROWS for v in variants.values())
    assert set(variants["reflect_both"]["reflection_status"]) == {"ok"}
    # Compression folded each input into its instruction: the text of the input is in it.
    compressed = [row for row in variants["origin"] if row["original_input"].strip()]
    assert len(compressed) == 4 and {row["compress_status"] for row in compressed} == {"ok"}
    for row in compressed:
        assert row["original_input"].strip() in row["instruction"] and row["input"] == ""
        assert row["instruction"].startswith(row["original_instruction"].strip())

    scorer = IFDScorer(max_length=512)
    scored = DatasetDict({name: ds.map(scorer, batched=True, batch_size=16) for name, ds in variants.items()})
    for name, ds in scored.items():
        assert set(ds["score_status"]) == {"ok"}, name
        assert all(math.isfinite(x) and x > 0 for c in ("ifd", "rifd", "ifd_loss", "rifd_loss") for x in ds[c])
    # The reflected instruction appends to the original, so its texts really differ per split.
    assert scored["origin"]["ifd"] != scored["reflect_instruction"]["ifd"]

    audit = explain_v2(scored)
    chosen = select_v2(scored)
    outcomes = np.array(audit["v2_outcome"])
    assert len(chosen) == int(np.isin(outcomes, V2_SOURCES).sum())
    assert list(chosen["id"]) == [i for i, o in zip(audit["id"], outcomes) if o in V2_SOURCES]
    assert len(chosen) > 0 and set(chosen["source"]) <= set(V2_SOURCES)
    # Every selected row passed the reference checks on the twin it came from.
    for row in chosen:
        assert row["ifd"] < 1 and row["rifd"] < 1
    loose = select_v2(scored, require_below_one=False)
    assert len(loose) >= len(chosen) and set(chosen["id"]) <= set(loose["id"])

    summary = summarize(scored)
    assert summary["selection"]["v2"]["selected"] == len(chosen)
    paths = plot_summary(summary, tmp_path / "plots")
    assert {p.name for p in paths} == {"ifd_hist.png", "rifd_hist.png", "lengths.png", "selection_funnel.png"}
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert float(image[..., :3].std()) > 0.01, f"{path.name} is blank"
