"""Tuna: the ranking prompt, the judge-answer parser, the map stages with scripted oracles, the loss."""

from __future__ import annotations

import hashlib
import math
import pickle

import pytest

from reflectune_hf.data import ColumnError
from reflectune_hf.oracles.base import ChatResult
from reflectune_hf.prompts import TUNA_RANKING_SYSTEM, tuna_ranking_messages, tuna_ranking_prompt
from reflectune_hf.tuna.stages import (
    ContextualRank, SampleResponses, extract_reference_response, format_prompt, parse_ranking, rank_by_logprob,
)

# --- the prompt ----------------------------------------------------------------------------------


def test_ranking_prompt_is_byte_identical_to_the_reference():
    text = tuna_ranking_prompt("P", ["a", "b", "c", "d"])
    # sha256 of the reference's prompt for instruct "P" and responses a, b, c, d (LMOps tuna/src/gpt-eval.py)
    assert hashlib.sha256(text.encode()).hexdigest() == "e7e5fedb9cdf9a22d4c53e2d60db09e2b70ed6fca743300e25f9ecb61e7a568d"
    assert "responses.Second" in text and "steps.Fourth" in text and "'rank: [i, j ,k, l, m]'" in text
    system, user = tuna_ranking_messages("P", ["a", "b", "c", "d"])
    assert system == {"role": "system", "content": "You are a professional and experienced data annotator."}
    assert TUNA_RANKING_SYSTEM == system["content"] and user["content"] == text


def test_ranking_prompt_for_other_counts_and_alpaca_prompt():
    text = tuna_ranking_prompt(format_prompt("Add.", "2 and 3"), ["5", "6"])
    assert text.startswith("Below is an instruction that describes a task, paired with an input")
    assert "### Input:\n2 and 3\n\n### Response:\n\n###Response 0:\n5\n\n###Response 1:\n6\n\n\nWe would" in text
    assert "rate Response 0/1 in reply" in text and "'###Response 2'" in text and "Response 0/1/2 and" in text
    assert format_prompt("Say hi.", "", template=None) == "Say hi."


# --- the parser: 33 judge answers ----------------------------------------------------------------

RANKINGS = [
    # (judge text, candidates incl. the reference, rank, found, duplicates, out of range)
    ("Response 0: 12\nResponse 1: 9\nResponse 2: 7\nResponse 3: 5\nResponse 4: 15\nrank: [4, 0, 1, 2, 3]",
     5, [4, 0, 1, 2, 3], True, [], []),
    ("Scores follow.\nRanking: [4, 2, 0, 1, 3]", 5, [4, 2, 0, 1, 3], True, [], []),
    ("RANK: [3, 4, 1, 0, 2]", 5, [3, 4, 1, 0, 2], True, [], []),
    ("**Rank:** [4, 1, 0, 2, 3]", 5, [4, 1, 0, 2, 3], True, [], []),
    ("**Ranking**: [0, 4, 3]", 5, [0, 4, 3], True, [], []),
    ("rank: 4, 0, 2, 1, 3\nResponse 4 is clearly the best with 15 points.", 5, [4, 0, 2, 1, 3], True, [], []),
    ("Responses 1 and 2 are duplicates.\nrank: [4, 0, 1, 3]", 5, [4, 0, 1, 3], True, [], []),  # judge de-duplicated
    ("rank: [4, 0, 0, 1, 2, 3]", 5, [4, 0, 1, 2, 3], True, [0], []),  # a repeated index
    ("rank: [4, 2, 2, 2, 1]", 5, [4, 2, 1], True, [2, 2], []),
    ("rank: [5, 4, 0, 1, 2, 3]", 5, [4, 0, 1, 2, 3], True, [], [5]),  # out of range
    ("rank: [4, -1, 0, 7, 1]", 5, [4, 0, 1], True, [], [-1, 7]),
    ("The format is 'rank: [i, j ,k, l, m]'.\nrank: [1, 0, 4, 2, 3]", 5, [1, 0, 4, 2, 3], True, [], []),
    ("rank: [4, 0, 1, 2, 3]\n\nOn reflection:\nrank: [4, 1, 0, 2, 3]", 5, [4, 1, 0, 2, 3], True, [], []),  # the last
    ("ranking: [Response 4, Response 2, Response 0, Response 1, Response 3]", 5, [4, 2, 0, 1, 3], True, [], []),
    ("Response 0: 10\nResponse 1: 11\nResponse 4: 15", 5, [], False, [], []),  # no ranking at all
    ("The responses are all good.", 5, [], False, [], []),
    ("", 5, [], False, [], []),
    ("rank: [i, j, k]", 5, [], False, [], []),  # only the format, echoed
    ("rank: (2, 0, 1)", 3, [2, 0, 1], True, [], []),  # two responses plus the reference
    ("rank: [4]", 5, [4], True, [], []),  # all duplicates of one another
    # Numbered and bulleted lists below the label: the list numbers are no indices.
    ("Ranking:\n1. Response 4\n2. Response 0\n3. Response 2", 5, [4, 0, 2], True, [], []),
    ("rank:\n- Response 2\n- Response 1", 3, [2, 1], True, [], []),
    ("Final ranking: Response 3 > Response 1 > Response 2", 5, [3, 1, 2], True, [], []),
    ("**Ranking:**\n\n1. **Response 4** (15 points)\n\n2. Response 1 (12 points)\n3. Response 0 (9 points)\n\n"
     "Response 4 is best: it has 3 examples.", 5, [4, 1, 0], True, [], []),  # scores beside, prose after
    ("Ranking: from best to worst\n1) 4\n2) 0\n3) 3", 5, [4, 0, 3], True, [], []),
    ("Ranking: (best first)\n\n  1. Response 2\n  2. Response 0", 3, [2, 0], True, [], []),
    ("rank:\n* Response 0\n* Response 0\n* Response 4", 5, [0, 4], True, [0], []),
    ("ranking: Response 4 (15), Response 2 (12), Response 0 (8)", 5, [4, 2, 0], True, [], []),
    ("Ranking:\n[4, 2, 0, 1, 3]", 5, [4, 2, 0, 1, 3], True, [], []),
    ("Ranking:\nResponse 1 > Response 0 > Response 4", 5, [1, 0, 4], True, [], []),
    ("Ranking:\nI could not decide: Response 1 has 2 errors.", 5, [], False, [], []),  # prose, not a list
    ("rank: [i, j, k]\nResponse 0: 12\nResponse 1: 9", 5, [], False, [], []),  # score lines are no ranking
    ("rank:", 5, [], False, [], []),  # the label at the very end
    # one bracket per index: the whole chain, not its first bracket alone
    ("rank: [2] > [1] > [4] > [3]", 5, [2, 1, 4, 3], True, [], []),
    ("Ranking: [4] > [0] > [2]\nResponse 4 is the best.", 5, [4, 0, 2], True, [], []),
    # a bare list, then prose naming a response on the same line: the list, not the prose's index
    ("Final rank: 2, 1, 4, 3, 0. I gave Response 3 a 9.", 5, [2, 1, 4, 3, 0], True, [], []),
    ("rank: 4, 0, 1 (Response 4 is my own)", 5, [4, 0, 1], True, [], []),
    ("rank: [1st: Response 2, 2nd: Response 0]", 5, [2, 0], True, [], []),
]


@pytest.mark.parametrize("text,candidates,rank,found,duplicates,out_of_range", RANKINGS)
def test_parse_ranking(text, candidates, rank, found, duplicates, out_of_range):
    parsed = parse_ranking(text, candidates)
    assert (parsed.rank, parsed.found, parsed.duplicates, parsed.out_of_range) == (rank, found, duplicates, out_of_range)
    assert parsed.repaired == bool(duplicates or out_of_range)


REFERENCES = [
    ("First, close-ended.\nSecond:\n###Response 4:\nParis is the capital of France.\n\nThird, no duplicates.",
     "Paris is the capital of France."),
    ("### Response 4:\nStep one: mix.\n\nStep two: bake for 20 minutes.\n\nResponse 0: 10\nrank: [4, 0]",
     "Step one: mix.\n\nStep two: bake for 20 minutes."),  # paragraphs kept (the reference stops at the first)
    ("###Response 4: The answer is 4.\nThird, there are no duplicate responses.", "The answer is 4."),
    ("###Response 4:\n```python\nprint(1)\n\nprint(2)\n```\n\nFourth, the scores:\nResponse 0: [12]",
     "```python\nprint(1)\n\nprint(2)\n```"),
    ("###Response 4:\nThe sky is blue.", "The sky is blue."),  # at the very end (the reference finds nothing)
    ("###Response 4:\nFirst, preheat.\nFinally, serve warm.\n\nLast, rank the responses: rank: [4, 1]",
     "First, preheat.\nFinally, serve warm."),  # the response's own steps are not the judge's
    ("No reference here.\nrank: [1, 0]", ""),
    ("Response 4: 15\nrank: [4, 0]", ""),  # a score line is no reference response
]


@pytest.mark.parametrize("text,expected", REFERENCES)
def test_extract_reference_response(text, expected):
    assert extract_reference_response(text, 4) == expected


# --- ContextualRank with a scripted judge ----------------------------------------------------------


class Judge:
    """Answers in turn from a list (per request); records the requests."""

    def __init__(self, answers):
        self.answers, self.requests = list(answers), []

    def complete(self, requests):
        self.requests += requests
        return [self.answers.pop(0) for _ in requests]


def ok(text):
    return ChatResult(texts=[text], usage={"total_tokens": 10})


def test_contextual_rank_statuses_keep_every_row():
    from datasets import Dataset

    responses = [["Paris.", "Lyon.", "Paris.", "London."]] * 4 + [[]]
    ds = Dataset.from_dict({"id": [10, 11, 12, 13, 14], "instruction": ["Capital of France?"] * 5,
                            "input": [""] * 5, "responses": responses})
    judge = Judge([
        ok("###Response 4:\nParis is the capital.\n\nThird, 0 and 2 are duplicates.\nrank: [4, 0, 1, 3]"),
        ok("rank: [0, 0, 4, 9]"),  # a duplicate, out of range, and no reference written
        ok("I cannot decide."),  # re-asked below
        ChatResult.failure("HTTP 500: boom"),
        ok("###Response 4:\nParis.\n\nrank: [4, 2, 1]"),  # the re-ask of row 12
    ])
    out = ds.map(ContextualRank(judge, format_retries=1), batched=True)
    assert out["id"] == [10, 11, 12, 13, 14] and out["ranking_status"] == [
        "ok", "repaired", "ok", "oracle_error", "no_responses"]
    assert out["rank"] == [[4, 0, 1, 3], [0], [4, 2, 1], [], []]  # row 11: the unwritten reference 4 is dropped
    assert out["reference_response"][:3] == ["Paris is the capital.", "", "Paris."]
    assert out["ranked_responses"][0] == ["Paris is the capital.", "Paris.", "Lyon.", "London."]
    assert out["ranked_responses"][1] == ["Paris."]  # the unwritten reference is left out
    for rank, texts, reference, ranked in zip(out["rank"], responses, out["reference_response"],
                                              out["ranked_responses"]):
        assert ranked == [(texts + [reference])[k] for k in rank]  # the two columns always agree
    assert "repeated indices [0]" in out["ranking_error"][1] and "out-of-range indices [9]" in out["ranking_error"][1]
    assert "no reference response: dropped" in out["ranking_error"][1] and out["ranking_error"][3] == "HTTP 500: boom"
    first, retry = judge.requests[0], judge.requests[-1]
    assert first.messages == retry.messages and first.temperature == 1.0 and first.max_tokens == 2048
    assert retry.seed == 1 and len(judge.requests) == 5  # one distinct re-ask; failed rows are not re-asked
    assert dict(first.messages[0])["content"] == TUNA_RANKING_SYSTEM
    assert "### Instruction:\nCapital of France?" in dict(first.messages[1])["content"]


def test_contextual_rank_with_no_index_left_is_no_ranking():
    # Every index out of range, or only the reference the judge did not write: nothing is ranked,
    # so the row is no_ranking (re-asked once), never "repaired" with empty ranked_responses.
    batch = {"id": [0, 1], "instruction": ["Capital of France?"] * 2, "responses": [["Paris.", "Lyon."]] * 2}
    judge = Judge([ok("rank: [5, 6, 7]"), ok("rank: [2]"), ok("rank: [3, 4]"), ok("rank: [2, 2]")])
    out = ContextualRank(judge, format_retries=1)(batch)
    assert out["ranking_status"] == ["no_ranking", "no_ranking"] and list(map(list, out["rank"])) == [[], []]
    assert "out-of-range indices [5, 6, 7]" in out["ranking_error"][0]  # the first answer is kept
    assert "no reference response" in out["ranking_error"][1] and len(judge.requests) == 4


def cut(text):
    return ChatResult(texts=[text], finish_reasons=["length"])


def test_a_ranking_cut_by_the_token_limit_is_reasked_longer_and_never_ok():
    """A judge's answer cut by the token limit ("rank: [4, 0, 1" and no more) read as a full
    ranking and was `ok` (never re-asked: the stage's worst_rank was 0). It is now re-asked with
    twice the budget; still cut, or with its list left open, the row is `partial` and keeps what
    was read."""
    rows = {"id": [0, 1, 2], "instruction": ["Name a colour."] * 3, "responses": [["Red", "Sky", "Blue", "Green"]] * 3}
    judge = Judge([
        cut("###Response 4:\nTeal.\n\nrank: [4, 0, 1"),  # row 0: cut twice
        cut("###Response 4:\nTeal.\n\nrank: [4, 0, 1"),  # row 1: cut, then a full answer
        ok("###Response 4:\nTeal.\n\nrank: [4, 2"),  # row 2: stopped inside its list, twice
        cut("###Response 4:\nTeal.\n\nrank: [4, 0, 1, 2"),
        ok("###Response 4:\nTeal.\n\nrank: [4, 2, 0, 3, 1]"),
        ok("###Response 4:\nTeal.\n\nrank: [4, 2, 0"),
    ])
    out = ContextualRank(judge, structured="off", max_tokens=100)(rows)
    assert out["ranking_status"] == ["partial", "ok", "partial"]
    assert out["rank"] == [[4, 0, 1], [4, 2, 0, 3, 1], [4, 2]]  # kept: the better answer of the two
    assert out["ranked_responses"][0] == ["Teal.", "Red", "Sky"]
    assert "cut by the token limit" in out["ranking_error"][0] and "not closed" in out["ranking_error"][2]
    assert [r.max_tokens for r in judge.requests] == [100, 100, 100, 200, 200, 100]  # cut: twice the budget
    assert out["ranking_error"][1] == ""


def test_a_ranking_stopped_by_a_content_filter_is_partial_not_ok():
    rows = {"id": [0], "instruction": ["Name a colour."], "responses": [["Red", "Sky"]]}
    filtered = ChatResult(texts=["###Response 2:\nTeal.\n\nrank: [2, 0, 1]"], finish_reasons=["content_filter"])
    out = ContextualRank(Judge([filtered, filtered]), structured="off", format_retries=1)(rows)
    assert out["ranking_status"] == ["partial"] and out["rank"] == [[2, 0, 1]]
    assert "content filter" in out["ranking_error"][0]


def test_contextual_rank_needs_responses_lists_and_ids():
    stage = ContextualRank(Judge([]))
    with pytest.raises(ColumnError, match="responses"):
        stage({"id": [0], "instruction": ["x"]})
    with pytest.raises(ColumnError, match="batched=True"):
        stage({"id": [0], "instruction": ["x"], "responses": ["a", "b"]})
    with pytest.raises(ColumnError, match="add_ids"):
        stage({"instruction": ["x"], "responses": [["a"]]})
    with pytest.raises(TypeError, match="complete"):
        ContextualRank(object())


def test_contextual_rank_names_a_bad_row_by_its_id_not_its_place_in_the_batch():
    """A non-string response was reported as '(row 1)' for the row with id 1001 (its place in
    its map batch), so the user looked at the wrong row."""
    with pytest.raises(ColumnError, match=r"row id=1001\)"):
        ContextualRank(Judge([]))({"id": [1000, 1001], "instruction": ["x", "y"], "responses": [["a"], ["b", 3]]})
    with pytest.raises(ColumnError, match=r"row id=7\)"):
        ContextualRank(Judge([]))({"instruction": ["x"], "responses": [[3]]}, [7])


# --- SampleResponses and rank_by_logprob -----------------------------------------------------------


def tokens(*logprobs):
    return [{"token": "t", "logprob": lp, "top_logprobs": []} for lp in logprobs]


class Teacher:
    def __init__(self):
        self.requests = []

    def complete(self, requests):
        self.requests += requests
        answers = {
            "A": ChatResult(texts=["x", "yy", "z"], logprobs=[tokens(-1.0, -3.0), tokens(-0.5), tokens(-4.0)]),
            "B": ChatResult(texts=["p", "q", ""], logprobs=[tokens(-1.0), None, []]),  # one without, one empty
            "C": ChatResult(texts=["r", "s", "t"]),  # a server that returns no logprobs
            "D": ChatResult.failure("timeout"),
        }
        return [answers[dict(r.messages[-1])["content"][-1]] for r in requests]


def test_sample_responses_then_rank_by_logprob():
    from datasets import Dataset
    from datasets.fingerprint import Hasher

    ds = Dataset.from_dict({"id": [0, 1, 2, 3], "instruction": ["A", "B", "C", "D"], "output": ["o"] * 4})
    teacher = Teacher()
    stage = SampleResponses(teacher, n=3, max_tokens=32, seed=5, template=None, system="Be brief.")
    out = ds.map(stage, batched=True).map(rank_by_logprob, batched=True)
    request = teacher.requests[0]
    assert (request.n, request.logprobs, request.temperature, request.max_tokens, request.seed) == (3, True, 1.0, 32, 5)
    assert request.message_dicts == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A"}]
    assert out["id"] == [0, 1, 2, 3] and out["output"] == ["o"] * 4
    assert out["sample_status"] == ["ok", "partial_logprobs", "no_logprobs", "oracle_error"]
    assert out["avg_logprobs"][0] == [-2.0, -0.5, -4.0]
    assert out["avg_logprobs"][1][0] == -1.0 and all(math.isnan(v) for v in out["avg_logprobs"][1][1:])
    assert out["responses"][3] == [] and out["sample_error"][3] == "timeout"
    assert out["ranked_responses"] == [["yy", "x", "z"], ["p"], [], []]
    assert out["ranked_avg_logprobs"][0] == [-0.5, -2.0, -4.0]
    assert out["ranking_status"] == ["ok", "partial", "no_scores", "no_responses"]
    # The fingerprint is the configuration: usage counters are not pickled.
    assert stage.usage == {} and pickle.loads(pickle.dumps(stage)).usage is None
    assert Hasher.hash(stage) == Hasher.hash(SampleResponses(teacher, n=3, max_tokens=32, seed=5, template=None,
                                                             system="Be brief."))


def test_rank_by_logprob_ties_and_errors():
    out = rank_by_logprob({"responses": [["a", "b", "c"]], "avg_logprobs": [[-1.0, -0.5, -1.0]]})
    assert out["ranked_responses"] == [["b", "a", "c"]]  # a tie keeps the sampling order
    # A blank response (whitespace tokens score high) is no response: never ranked, let alone first.
    out = rank_by_logprob({"responses": [["a", " \n", "b"], ["", " "]], "avg_logprobs": [[-1.0, -0.1, -2.0],
                                                                                      [-0.2, -0.3]]})
    assert out["ranked_responses"] == [["a", "b"], []] and out["ranking_status"] == ["partial", "no_responses"]
    with pytest.raises(ColumnError, match="row 0 of the batch has 2 responses but 1"):
        rank_by_logprob({"responses": [["a", "b"]], "avg_logprobs": [[-1.0]]})
    with pytest.raises(ColumnError, match="batched=True"):
        rank_by_logprob({"responses": ["a", "b"], "avg_logprobs": [-1.0, -2.0]})
    with pytest.raises(ColumnError, match="avg_logprobs"):
        rank_by_logprob({"responses": [["a"]]})
    with pytest.raises(ValueError, match="Unknown scoring template"):
        SampleResponses(Teacher(), template="nope")


def test_blank_or_missing_responses_are_not_ok():
    """Without logprobs a row was `ok` once answered, even when its responses were blank (the
    judge then ranked "" and Tuna trained EOS-only targets) or fewer than `n` came back."""
    class Student:
        def complete(self, requests):
            texts = {"A": ["Red.", "Blue."], "B": ["Red.", "  \n"], "C": ["Red."]}
            return [ChatResult(texts=texts[dict(r.messages[-1])["content"][-1]]) for r in requests]

    out = SampleResponses(Student(), n=2, logprobs=False, template=None)(
        {"id": [0, 1, 2], "instruction": ["A", "B", "C"]})
    assert out["sample_status"] == ["ok", "missing_responses", "missing_responses"]
    assert out["responses"][1] == ["Red.", "  \n"]
    assert out["sample_error"][1] == "1 of the 2 responses came back with text"
    assert out["sample_error"][0] == ""


def test_local_transformers_oracle_as_teacher_and_judge(smollm2_dir):
    from reflectune_hf.oracles import TransformersOracle

    oracle = TransformersOracle(cache=False)
    out = SampleResponses(oracle, n=2, max_tokens=4, seed=1)({"id": [7], "instruction": ["Name a colour."]})
    assert out["sample_status"] == ["ok"] and len(out["responses"][0]) == 2
    assert all(math.isfinite(v) and v <= 0 for v in out["avg_logprobs"][0])
    # A real (if tiny) judge reading the whole Tuna prompt: whatever it writes, the row says what happened.
    judged = ContextualRank(oracle, max_tokens=12, format_retries=0)({"id": [7], "instruction": ["Name a colour."],
                                                                     "responses": out["responses"]})
    assert judged["ranking_raw"][0] and oracle.usage["requests"] == 2
    assert judged["ranking_status"][0] in ("ok", "repaired", "no_ranking")
    assert all(0 <= k <= 2 for k in judged["rank"][0])


def test_a_first_batch_of_failures_does_not_fix_the_column_types():
    """datasets infers list<null> from a batch of empty lists; later batches with values must still write."""
    from datasets import Dataset

    ds = Dataset.from_dict({"id": [0, 1, 2], "instruction": ["D", "A", "B"]})
    out = ds.map(SampleResponses(Teacher(), n=3, template=None), batched=True, batch_size=1)
    out = out.map(rank_by_logprob, batched=True, batch_size=1)
    assert out["sample_status"] == ["oracle_error", "ok", "partial_logprobs"]
    assert out["ranked_responses"] == [[], ["yy", "x", "z"], ["p"]]
    assert str(out.features["avg_logprobs"].feature) == "Value('float64')"
    judge = Judge([ChatResult.failure("down"), ok("rank: [1, 0]")])
    ranked = out.map(ContextualRank(judge, template=None, format_retries=0), batched=True, batch_size=1)
    assert ranked["ranking_status"] == ["no_responses", "oracle_error", "ok"] and ranked["rank"][2] == [1, 0]


def test_blank_or_invalid_instructions_send_nothing_and_keep_their_rows():
    """A blank instruction ("", None, "   ") was sent to the teacher and to the judge and the row
    was `ok`. Like the reflection stages (`row_checks.skip_reason`), such a row now sends nothing
    and says `empty_input`; text that is not valid UTF-8 says `invalid_text`."""
    from datasets import Dataset

    from reflectune_hf.tuna.stages import RANKING_STATUSES, SAMPLE_STATUSES

    class AnyTeacher(Teacher):  # answers every request, whatever its text
        def complete(self, requests):
            self.requests += requests
            return [ChatResult(texts=["x"] * r.n, logprobs=[tokens(-1.0)] * r.n) for r in requests]

    teacher = AnyTeacher()
    rows = {"id": [0, 1, 2, 3, 4], "instruction": ["", None, "   ", "A", "A"], "input": ["", "", "", "\ud800", ""]}
    out = SampleResponses(teacher, n=3, template=None)(rows)
    assert out["sample_status"] == ["empty_input"] * 3 + ["invalid_text", "ok"]
    assert out["responses"][:4] == [[]] * 4 and len(out["responses"][4]) == 3 and len(teacher.requests) == 1
    assert "nothing was sent" in out["sample_error"][0] and out["sample_error"][4] == ""
    # A first batch of skipped rows (only empty lists) does not fix the column types.
    ds = Dataset.from_dict({"id": [0, 1], "instruction": [" ", "A"]})
    mapped = ds.map(SampleResponses(AnyTeacher(), n=2, logprobs=False), batched=True, batch_size=1)
    assert mapped["sample_status"] == ["empty_input", "ok"] and mapped["responses"] == [[], ["x", "x"]]

    judge = Judge([ok("###Response 1:\nB.\n\nrank: [1, 0]")])
    ranked = ContextualRank(judge, template=None, structured="off")(
        {**rows, "responses": [["a"]] * 4 + [["\ud800"]]})
    assert ranked["ranking_status"] == ["empty_input"] * 3 + ["invalid_text", "invalid_text"]
    assert [list(r) for r in ranked["rank"]] == [[]] * 5 and judge.requests == []
    assert {*out["sample_status"], *ranked["ranking_status"]} - {"ok"} <= set(SAMPLE_STATUSES) & set(RANKING_STATUSES)


CALLS = []


class CountingJudge:
    """A picklable judge that records its calls outside itself (its pickle, the fingerprint, stays the same)."""

    def complete(self, requests):
        CALLS.extend(requests)
        return [ok("###Response 2:\nA reference.\n\nrank: [2, 1, 0]") for _ in requests]


def test_a_repeated_map_is_served_by_the_datasets_cache(sample):
    rows = sample.select(range(3)).map(lambda r: {"responses": [r["output"], "Another answer."]})
    CALLS.clear()
    first = rows.map(ContextualRank(CountingJudge()), batched=True)
    again = rows.map(ContextualRank(CountingJudge()), batched=True)
    assert len(CALLS) == 3 and again["rank"] == first["rank"] == [[2, 1, 0]] * 3
    assert first.cache_files and again.cache_files[0]["filename"] == first.cache_files[0]["filename"]
