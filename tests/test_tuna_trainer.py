"""Tuna's loss: the pure function on hand-checked numbers, and `TunaTrainer.compute_loss` against the
formula computed independently, candidate by candidate, on a tiny random Llama."""

from __future__ import annotations

import math

import pytest
import torch

from reflectune_hf.tuna.trainer import DataCollatorForTuna, TunaConfig, TunaTrainer, ranking_loss, tuna_loss

NAN = float("nan")


def test_tuna_loss_hand_checked():
    scores = torch.tensor([[-1.0, -1.2, -0.9, NAN],
                           [-0.5, -0.5, NAN, NAN]])
    # gap 1: row 0 pairs (0,1) max(0, -1.2 + 1.0 + 0.1) = 0, (1,2) max(0, -0.9 + 1.2 + 0.1) = 0.4;
    #        row 1 pair (0,1) max(0, 0 + 0.1) = 0.1; pairs with a NaN are left out: (0 + 0.4 + 0.1) / 3
    # gap 2: row 0 pair (0,2) max(0, -0.9 + 1.0 + 0.2) = 0.3 -> 0.3
    # gap 3: no pair -> 0
    expected_rank = 0.5 / 3 + 0.3
    assert float(ranking_loss(scores)) == pytest.approx(expected_rank, abs=1e-6)
    assert float(tuna_loss(scores, ce=torch.tensor(2.0))) == pytest.approx(2.0 + expected_rank, abs=1e-6)
    assert float(tuna_loss(scores, ce=2.0, margin=0.0, mle_weight=0.5)) == pytest.approx(1.0 + 0.3 / 3 + 0.1, abs=1e-6)
    # A gap-g pair only counts when both sides have a score; an all-NaN batch has no ranking loss.
    assert float(ranking_loss(torch.full((2, 3), NAN))) == 0.0


def test_ranking_loss_gradients_are_finite_with_missing_candidates():
    scores = torch.tensor([[-1.0, NAN, -0.8]], requires_grad=True)
    loss = ranking_loss(scores)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.4, abs=1e-6)  # max(0, -0.8 + 1.0 + 0.2)
    assert scores.grad.tolist() == [[-1.0, 0.0, 1.0]]
    with pytest.raises(ValueError, match=r"\[batch, N\]"):
        ranking_loss(torch.zeros(3))


@pytest.fixture(scope="module")
def tiny():
    """A tiny random Llama (vocab 64) and a SmolLM2 tokenizer's pad id stand-in."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return LlamaForCausalLM(config).eval()


class TinyTokenizer:
    """Just enough of a tokenizer for the Trainer (the batch is built by hand)."""

    pad_token_id, eos_token_id, pad_token, eos_token = 0, 1, "<pad>", "</s>"


def trainer_for(model, tmp_path, **tuna):
    args = TunaConfig(str(tmp_path / "out"), use_cpu=True, report_to="none", save_strategy="no", **tuna)
    return TunaTrainer(model, args=args, processing_class=TinyTokenizer())


# Two prompts; the first has 3 ranked candidates, the second 2 (its third slot is absent).
FEATURES = [
    {"prompt_ids": [2, 10, 11, 12], "candidate_ids": [[20, 21, 1], [22, 1], [23, 24, 25, 1]]},
    {"prompt_ids": [2, 13], "candidate_ids": [[30, 31, 32, 33, 1], [34, 1]]},
]


def formula(model, features, margin=0.1, mle_weight=1.0, ce="all"):
    """Tuna's loss computed the slow way: one unpadded forward per candidate, Python arithmetic."""
    scores, nll_total, token_total = [], 0.0, 0
    with torch.no_grad():
        for feature in features:
            row = []
            for rank, candidate in enumerate(feature["candidate_ids"]):
                ids = feature["prompt_ids"] + candidate
                logprobs = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
                start = len(feature["prompt_ids"])
                token_lps = [float(logprobs[t - 1, ids[t]]) for t in range(start, len(ids))]
                row.append(sum(token_lps) / len(token_lps) if token_lps else NAN)
                if ce == "all" or rank == 0:
                    nll_total -= sum(token_lps)
                    token_total += len(token_lps)
            scores.append(row)
    width = max(len(r) for r in scores)
    scores = [r + [NAN] * (width - len(r)) for r in scores]
    rank_loss = 0.0
    for gap in range(1, width):
        hinges = [max(0.0, r[j + gap] - r[j] + margin * gap) for r in scores for j in range(width - gap)
                  if not math.isnan(r[j]) and not math.isnan(r[j + gap])]
        rank_loss += sum(hinges) / len(hinges) if hinges else 0.0
    return mle_weight * nll_total / token_total + rank_loss, scores


@pytest.mark.parametrize("ce", ["all", "best"])
def test_compute_loss_equals_the_formula(tiny, tmp_path, ce):
    trainer = trainer_for(tiny, tmp_path, margin=0.3, mle_weight=0.7, ce_candidates=ce)
    inputs = DataCollatorForTuna(pad_token_id=0)(FEATURES)
    assert inputs["input_ids"].shape == (5, 8) and inputs["candidate_index"].tolist() == [[0, 1, 2], [3, 4, -1]]
    loss, outputs = trainer.compute_loss(tiny, inputs, return_outputs=True)
    expected, scores = formula(tiny, FEATURES, margin=0.3, mle_weight=0.7, ce=ce)
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-5)
    got = outputs["avg_logprobs"].tolist()
    assert math.isnan(got[1][2]) and got[0] == pytest.approx(scores[0], abs=1e-5)
    assert got[1][:2] == pytest.approx(scores[1][:2], abs=1e-5)
    assert set(trainer._metrics["eval"]) == {"ce_loss", "rank_loss", "rank_accuracy"}


def test_compute_loss_calls_tuna_loss(tiny, tmp_path, monkeypatch):
    """The trainer's loss is the pure function's, on its [batch, N] scores and its CE (one definition)."""
    import reflectune_hf.tuna.trainer as tuna_trainer

    calls = []

    def spy(avg_logprobs, ce, margin=0.1, mle_weight=1.0):
        calls.append((avg_logprobs.detach().clone(), float(ce.detach()), margin, mle_weight))
        return tuna_loss(avg_logprobs, ce, margin=margin, mle_weight=mle_weight)

    monkeypatch.setattr(tuna_trainer, "tuna_loss", spy)
    trainer = trainer_for(tiny, tmp_path, margin=0.3, mle_weight=0.7)
    loss, outputs = trainer.compute_loss(tiny, DataCollatorForTuna(pad_token_id=0)(FEATURES), return_outputs=True)
    [(scores, ce, margin, mle_weight)] = calls
    assert (margin, mle_weight) == (0.3, 0.7) and scores.shape == (2, 3) and math.isnan(scores[1, 2])
    assert torch.equal(scores.nan_to_num(), outputs["avg_logprobs"].nan_to_num())
    assert float(loss.detach()) == pytest.approx(float(tuna_loss(scores, ce, margin=0.3, mle_weight=0.7)), abs=1e-6)


def test_compute_loss_is_nan_safe_when_a_candidate_is_truncated_away(tiny, tmp_path):
    trainer = trainer_for(tiny, tmp_path)
    # Row 2's prompt filled max_length: its candidates kept no response token (TunaTokenize gives []).
    features = FEATURES[:1] + [{"prompt_ids": [2, 13, 14, 15], "candidate_ids": [[], []]}]
    inputs = DataCollatorForTuna(pad_token_id=0)(features)
    tiny.train()
    try:
        loss = trainer.compute_loss(tiny, inputs)
        loss.backward()
    finally:
        tiny.eval()
    expected, _ = formula(tiny, features[:1])
    assert math.isfinite(float(loss.detach())) and float(loss.detach()) == pytest.approx(expected, abs=1e-5)
    grads = [p.grad for p in tiny.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    tiny.zero_grad()


def test_tokenize_truncates_and_drops_rows_without_candidates(tmp_path, caplog):
    from datasets import Dataset

    from reflectune_hf.data import ColumnError
    from reflectune_hf.models import load_tokenizer
    from reflectune_hf.tuna.trainer import TunaTokenize

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    data = Dataset.from_dict({"id": [0, 1, 2], "instruction": ["Say hi.", "Count.", "word " * 80],
                              "input": ["", "1 to 3", ""],
                              "ranked_responses": [["Hi there, friend!", "Hello."], [], ["One."]]})
    out = data.map(TunaTokenize(tokenizer, max_length=40, max_candidates=1), batched=True)
    prompt = tokenizer("Below is an instruction that describes a task. Write a response that appropriately "
                       "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:")["input_ids"]
    assert out["prompt_ids"][0] == prompt
    assert out["candidate_ids"][0] == [(tokenizer("Hi there, friend!", add_special_tokens=False)["input_ids"]
                                        + [tokenizer.eos_token_id])[:40 - len(prompt)]]
    assert out["candidate_ids"][1] == [] and len(out["prompt_ids"][2]) == 40 and out["candidate_ids"][2] == [[]]
    with caplog.at_level("WARNING"):
        prepared = TunaTrainer._prepare_dataset(data, tokenizer, TunaConfig(str(tmp_path), max_length=40),
                                                {"template": "alpaca", "max_length": 40, "max_candidates": None,
                                                 "dataset_num_proc": None}, "train")
    assert prepared.num_rows == 2 and "1 train rows have no ranked response" in caplog.text
    assert "prompts of >= max_length=40" in caplog.text
    with pytest.raises(ValueError, match="no train row has a ranked response"):
        TunaTrainer._prepare_dataset(data.select([1]), tokenizer, TunaConfig(str(tmp_path)),
                                     {"template": "alpaca", "max_length": 40, "max_candidates": None,
                                      "dataset_num_proc": None}, "train")
    with pytest.raises(ValueError, match="ce_candidates"):
        TunaConfig(str(tmp_path), ce_candidates="worst")
    # A bad row is named by its index in the data, not in its map batch of 1000 (it said "row 1" for row 1001).
    bad = Dataset.from_dict({"instruction": ["x"] * 1002, "ranked_responses": [["a"]] * 1001 + [["a", None]]})
    with pytest.raises(ColumnError, match=r"ranked_responses of row 1001 must be a list of strings"):
        TunaTrainer._prepare_dataset(bad, tokenizer, TunaConfig(str(tmp_path)),
                                     {"template": "alpaca", "max_length": 40, "max_candidates": None,
                                      "dataset_num_proc": None}, "train")


def test_rows_with_a_system_prompt_of_their_own_train_with_a_warning(tmp_path, caplog):
    """TRL data with a system turn keeps it in a `system` column: Tuna's Alpaca prompt has no place
    for it, and the rows trained without it, silently (`reflectune tuna` even dropped the column)."""
    import json

    from datasets import Dataset

    from reflectune_hf.cli import tuna_job
    from reflectune_hf.models import load_tokenizer

    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
             {"role": "assistant", "content": "Hello."}]
    path = tmp_path / "ranked.jsonl"
    path.write_text("".join(json.dumps({"messages": m, "ranked_responses": ["Hi.", "Yo."]}) + "\n"
                            for m in (turns, turns[1:])))
    loaded = tuna_job.load_ranked_data(tuna_job.TunaScriptArguments(dataset_name=str(path)), "unused")
    assert loaded["system"] == ["Be brief.", ""]
    with caplog.at_level("WARNING", logger="reflectune_hf.tuna.trainer"):
        prepared = TunaTrainer._prepare_dataset(loaded, load_tokenizer("smollm2-135m-instruct"), TunaConfig(
            str(tmp_path)), {"template": "alpaca", "max_length": 64, "max_candidates": None, "dataset_num_proc": None},
            "train")
    assert len(prepared) == 2 and "1 of 2 train rows have a system prompt of their own" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="reflectune_hf.tuna.trainer"):
        TunaTrainer._prepare_dataset(Dataset.from_dict({"instruction": ["Hi?"], "system": [""],
                                                        "ranked_responses": [["Hi."]]}),
                                     load_tokenizer("smollm2-135m-instruct"), TunaConfig(str(tmp_path)),
                                     {"template": "alpaca", "max_length": 64, "max_candidates": None,
                                      "dataset_num_proc": None}, "train")
    assert "system prompt" not in caplog.text


def test_recipes_parse():
    from pathlib import Path

    from reflectune_hf.cli import tuna_job as script

    repo = Path(__file__).resolve().parents[1]
    for stage, lr in (("probabilistic", 1e-5), ("contextual", 1e-6)):
        script_args, args, model_args = script.make_parser().parse_args_and_config(
            ["--config", str(repo / "scripts" / "configs" / f"tuna_{stage}.yaml"), "--use_cpu", "true",
             "--output_dir", "unused"])
        assert (script_args.stage, args.learning_rate, args.num_train_epochs, args.max_length) == (stage, lr, 1, 512)
        assert (args.template, args.margin, args.mle_weight, args.ce_candidates) == ("alpaca", 0.1, 1.0, "all")
        assert not args.remove_unused_columns
        # fp32 master weights, bf16 autocast (as the Vicuna recipes): lr 1e-6 would vanish in bf16 weights.
        assert model_args.dtype == "float32" and args.bf16


def test_trainer_accumulates_and_evaluates_pretokenized_rows(tiny, tmp_path):
    from datasets import Dataset

    data = Dataset.from_list(FEATURES * 2)  # already tokenized: used as it is
    args = TunaConfig(str(tmp_path / "out"), use_cpu=True, report_to="none", save_strategy="no", max_steps=2,
                      per_device_train_batch_size=1, gradient_accumulation_steps=2, per_device_eval_batch_size=2,
                      train_sampling_strategy="sequential", learning_rate=0.0, logging_steps=1, disable_tqdm=True)
    trainer = TunaTrainer(tiny, args=args, train_dataset=data, eval_dataset=data, processing_class=TinyTokenizer())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # Each step accumulates the rows F0 and F1: its loss is the mean of theirs (the Trainer divides ours by 2).
    per_row = [formula(tiny, FEATURES[i:i + 1])[0] for i in range(2)]
    assert losses == pytest.approx([sum(per_row) / 2] * 2, abs=1e-4)
    metrics = trainer.evaluate()  # one batch of F0 and F1 together
    assert metrics["eval_loss"] == pytest.approx(formula(tiny, FEATURES)[0], abs=1e-4)
    assert {"eval_ce_loss", "eval_rank_loss", "eval_rank_accuracy"} <= set(metrics)


def _sentencepiece_like_tokenizer(text: str):
    """A Llama-like tokenizer (the reference's): "▁" prepended, spaces as "▁", one Unigram
    segmentation of the whole string, BOS first. It spells "The" after "Response:" differently
    from "The" alone ("▁The"), as SentencePiece does."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", "▁Response", ":", "The", "▁The", "▁end"]
    chars = sorted(set(text.replace(" ", "▁")) | {"▁"})
    vocab = [(p, 0.0) for p in pieces[:3]] + [(p, -1.0) for p in pieces[3:]] + [(c, -10.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _labels_start_at_the_prompts_token_count(tokenizer, prompt: str, response: str, row: dict, k: int):
    """Candidate k of a tokenized row, collated, is the joint string's tokens plus EOS, and its labels
    start at `len(tok(prompt))`: the one response rule (`scoring.spans.response_span`), as IFD scores."""
    batch = DataCollatorForTuna(tokenizer.pad_token_id or 0)([row])
    ids, labels = batch["input_ids"][k].tolist(), batch["labels"][k].tolist()
    joint = tokenizer(prompt + response)["input_ids"]
    n = len(joint)
    assert ids[:n + 1] == joint + [tokenizer.eos_token_id]  # as the model reads it in training
    start = next(i for i, label in enumerate(labels) if label != -100)
    assert start == len(tokenizer(prompt)["input_ids"])
    assert labels[start:n + 1] == ids[start:n + 1] and set(labels[n + 1:]) <= {-100}
    return joint[start]


def test_candidates_are_tokenized_with_their_prompt_as_one_string():
    from datasets import Dataset

    from reflectune_hf.models import load_tokenizer
    from reflectune_hf.tuna.stages import format_prompt
    from reflectune_hf.tuna.trainer import TunaTokenize

    prompt = format_prompt("Say hi.")
    # SentencePiece: "Response:The" -> "▁Response", ":", "The"; "The" alone is "▁The".
    spm = _sentencepiece_like_tokenizer(prompt + "The end.")
    row = Dataset.from_dict({"instruction": ["Say hi."], "ranked_responses": [["The end.", " The end."]]}).map(
        TunaTokenize(spm), batched=True)[0]
    assert row["candidate_prompt_lengths"] == [len(row["prompt_ids"])] * 2
    assert row["candidate_label_offsets"] == [0, 0]
    assert spm.convert_ids_to_tokens(row["candidate_ids"][0][:1]) == ["The"]  # not "▁The"
    assert spm.convert_ids_to_tokens(row["candidate_ids"][1][:2]) == ["▁The", "▁end"]
    for k, response in enumerate(["The end.", " The end."]):
        _labels_start_at_the_prompts_token_count(spm, prompt, response, row, k)
    # SmolLM2's byte-level BPE merges across the boundary: "Response:" + "-) ok" is "Response", ":-", ")", " ok"
    # ("-)" alone). The candidate starts at the merged token, after the prompt's tokens before it; the merged
    # token is context (it stands where the prompt's ":" stood) and the labels start at the next one.
    smol = load_tokenizer("smollm2-135m-instruct")
    responses = ["Hi there!", "-) ok", "'s fine"]
    row = Dataset.from_dict({"instruction": ["Say hi."], "ranked_responses": [responses]}).map(
        TunaTokenize(smol, max_length=64), batched=True)[0]
    assert row["candidate_prompt_lengths"] == [len(row["prompt_ids"]), len(row["prompt_ids"]) - 1,
                                               len(row["prompt_ids"]) - 1]
    assert row["candidate_label_offsets"] == [0, 1, 1]
    assert smol.convert_ids_to_tokens([row["candidate_ids"][1][0], row["candidate_ids"][2][0]]) == [":-", ":'"]
    first = [_labels_start_at_the_prompts_token_count(smol, prompt, r, row, k) for k, r in enumerate(responses)]
    assert smol.convert_ids_to_tokens(first) == ["Hi", ")", "s"]
    # A model trained on these rows is scored as it generates: the truncation keeps max_length.
    short = Dataset.from_dict({"instruction": ["Say hi."], "ranked_responses": [responses]}).map(
        TunaTokenize(smol, max_length=len(row["prompt_ids"]) + 2), batched=True)[0]
    assert [cut + len(c) for cut, c in zip(short["candidate_prompt_lengths"], short["candidate_ids"])] == [
        len(row["prompt_ids"]) + 2] * 3


def test_collator_without_label_offsets_labels_every_candidate_token():
    """Pre-tokenised rows without `candidate_label_offsets` (older datasets) label every candidate
    token; an offset keeps that many leading candidate tokens as context."""
    rows = [{"prompt_ids": [5, 6, 7], "candidate_ids": [[8, 9, 2]], "candidate_prompt_lengths": [2]}]
    assert DataCollatorForTuna(0)(rows)["labels"].tolist() == [[-100, -100, 8, 9, 2]]
    rows[0]["candidate_label_offsets"] = [1]
    batch = DataCollatorForTuna(0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 8, 9, 2]] and batch["labels"].tolist() == [[-100, -100, -100, 9, 2]]


def test_tuna_scores_the_tokens_and_loss_of_the_one_response_rule(smollm2_dir):
    """On a boundary merge, the collated candidate's labelled tokens are `response_span`'s scored
    tokens (with EOS), and Tuna's mean log-prob of it is minus the scoring engine's mean loss of
    that span, on the real SmolLM2."""
    from datasets import Dataset

    from reflectune_hf.models import load_causal_lm
    from reflectune_hf.scoring.engine import check_model, mean_token_losses
    from reflectune_hf.scoring.spans import response_span
    from reflectune_hf.tuna.stages import format_prompt
    from reflectune_hf.tuna.trainer import TunaTokenize, candidate_scores

    model, tok = load_causal_lm(smollm2_dir, device="cpu")
    prompt, responses = format_prompt("Smile."), ["-) ok", ":-) sure", "Hello!"]
    row = Dataset.from_dict({"instruction": ["Smile."], "ranked_responses": [responses]}).map(
        TunaTokenize(tok, max_length=64), batched=True)[0]
    batch = DataCollatorForTuna(tok.pad_token_id)([row])
    spans = [response_span(tok, prompt, r, max_length=64, eos=True) for r in responses]
    for k, span in enumerate(spans):
        ids, labels = batch["input_ids"][k].tolist(), batch["labels"][k].tolist()
        assert ids[:len(span.ids)] == span.ids
        assert labels[:span.start] == [-100] * span.start and labels[span.start:len(span.ids)] == span.ids[span.start:]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mean, _, counts = candidate_scores(logits, batch["labels"])
    assert counts.tolist() == [s.n_scored for s in spans]
    engine = mean_token_losses(model, spans, tok.pad_token_id, **check_model(model).kwargs())
    assert mean.tolist() == pytest.approx([-x for x in engine], rel=1e-5)
