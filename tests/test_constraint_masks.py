"""The format masks of `LocalConstraint` are llguidance's exact masks: the answer slices
(`ANSWER_SLICES`, a speed-up) admit the same tokens as llguidance's default token grouping, step
by step along real answers of every stage shape."""

import numpy as np
import pytest

llguidance = pytest.importorskip("llguidance")
import llguidance.hf  # noqa: E402

from reflectune_hf.models import load_tokenizer, resolve_model  # noqa: E402
from reflectune_hf.oracles.local_decode import LocalConstraint  # noqa: E402
from reflectune_hf.oracles.stage_formats import stage_answer_format  # noqa: E402

ANSWERS = {
    "instruction": "1. Vague: no length, no format.\n2. [New Instruction] Write a four-line poem about the sea, "
                   "with rhymes (see arr[0]). [End]\n3. [New Answer] The sea is wide, the sea is deep,\n"
                   "its waves are where the sailors sleep. [End]",
    "response": "Too short, and it misses the point.\n[Better Answer] Paris is the capital of France; "
                "it lies on the Seine\t(about 2 million people, \u00e9t\u00e9 2024). [End]",
    "compress": "[New Instruction] Summarise the text in # one line. [End]",
    "judge": "8 6.5\nAnswer A is more precise [1] and cites #3; B rambles.",
    "ranking": "Close-ended question.\n###Response 4:\nBlue, because of Rayleigh scattering.\n\n"
               "Response 0: 9\nResponse 1: 4\nResponse 2: 12\nResponse 3: 0\nResponse 4: 15\nrank: [4, 2, 0]",
}


@pytest.mark.parametrize("stage", sorted(ANSWERS))
def test_answer_slices_give_llguidance_s_default_masks(stage, smollm2_dir):
    tokenizer = load_tokenizer(resolve_model("smollm2-135m-instruct"))
    regex = stage_answer_format(stage, 192).regex()
    constraint = LocalConstraint(tokenizer, regex)
    fast = constraint.matcher()
    plain = llguidance.LLMatcher(llguidance.hf.from_tokenizer(tokenizer), constraint.grammar)
    ids = tokenizer(ANSWERS[stage], add_special_tokens=False)["input_ids"]
    for step, token in enumerate(ids + [None]):
        expected = np.frombuffer(plain.compute_bitmask(), dtype=np.uint8)
        got = np.frombuffer(fast.compute_bitmask(), dtype=np.uint8)
        assert np.array_equal(got, expected), f"{stage}: masks differ at step {step}"
        assert 0 < np.unpackbits(got).sum() < len(tokenizer)  # a real constraint, not all or nothing
        if token is not None:
            assert fast.consume_token(token) and plain.consume_token(token), (stage, step, fast.get_error())
    assert fast.is_accepting()  # the whole answer is in the shape
