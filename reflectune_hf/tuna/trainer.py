"""Tuna's ranking loss and its trainer: cross-entropy plus the rank-gap margin loss (REFERENCE.md §10).

For a prompt with N candidate responses ranked best first, `s_k` is the length-normalised score
of candidate k: the mean log-probability of its response tokens (EOS included) under the model.
The ranking loss asks every candidate to beat each one ranked g places below it by a margin
that grows with the gap:

    L_rank = sum over g = 1..N-1 of  mean over j of  max(0, s_{j+g} - s_j + margin * g)
    loss   = mle_weight * CE + L_rank

The response tokens are those of the method's one rule, `scoring.spans.response_span` (the one
IFD and the quality report score): `prompt + response` tokenised as one string, the labels from
`len(tok(prompt))` on, plus EOS. `candidate_scores` computes the same mean loss as the scoring
engine (`scoring.engine.mean_token_losses`) does for that span, but on the training forward, with
gradients. A candidate without any response token (empty slot, or truncated away because the
prompt fills `max_length`) has no score: its pairs are left out of the means (the reference
divides by zero and the loss becomes NaN), and a gap with no pair adds nothing.

Where CE applies (`ce_candidates`): `"all"` (default, as the reference) is the token-level mean
negative log-likelihood over the response tokens of every candidate of the batch, so low-ranked
candidates are also imitated and the ranking loss only reorders them; `"best"` restricts CE to
each prompt's top-ranked candidate (imitate the best, rank the rest).

Example:
    >>> import torch
    >>> from reflectune_hf.tuna.trainer import tuna_loss
    >>> scores = torch.tensor([[-1.0, -1.05, -2.0]])  # best first
    >>> round(float(tuna_loss(scores, ce=torch.tensor(1.0))), 4)  # 1.0 + (0.05 + 0) / 2 + 0
    1.025
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from ..data import ColumnError, require_columns
from ..utils import LazyState

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_TUNA_FIELDS = ("mle_weight", "margin", "ce_candidates", "max_length", "template", "max_candidates", "dataset_num_proc")


def ranking_loss(avg_logprobs: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """The rank-gap margin loss of a `[batch, N]` tensor of scores ranked best first.

    `sum_g mean_j max(0, s[:, j+g] - s[:, j] + margin * g)`; NaN entries (candidates without a
    score) are left out of the pairs, and a gap without any pair adds 0.

    Example:
        >>> import torch
        >>> from reflectune_hf.tuna.trainer import ranking_loss
        >>> round(float(ranking_loss(torch.tensor([[-1.0, float("nan"), -1.0]]))), 4)  # one pair, gap 2
        0.2
    """
    if avg_logprobs.dim() != 2:
        raise ValueError(f"avg_logprobs must be [batch, N], got shape {tuple(avg_logprobs.shape)}")
    valid = torch.isfinite(avg_logprobs)
    scores = torch.where(valid, avg_logprobs, torch.zeros_like(avg_logprobs))  # no NaN enters the graph
    loss = scores.new_zeros(())
    for gap in range(1, avg_logprobs.shape[1]):
        pairs = valid[:, :-gap] & valid[:, gap:]
        if pairs.any():
            hinge = torch.relu(scores[:, gap:] - scores[:, :-gap] + margin * gap)
            loss = loss + hinge[pairs].mean()
    return loss


def tuna_loss(avg_logprobs: torch.Tensor, ce, margin: float = 0.1, mle_weight: float = 1.0) -> torch.Tensor:
    """Tuna's loss: `mle_weight * ce + ranking_loss(avg_logprobs, margin)`.

    Args:
        avg_logprobs: `[batch, N]` length-normalised log-probabilities of the candidates, best
            first; NaN marks a candidate without a score.
        ce: the cross-entropy term (a scalar tensor or a number).
        margin: the margin per rank gap (Tuna: 0.1). mle_weight: the weight of CE (Tuna: 1.0).

    Example:
        >>> import torch
        >>> from reflectune_hf.tuna.trainer import tuna_loss
        >>> round(float(tuna_loss(torch.tensor([[-2.0, -1.0]]), ce=0.5, mle_weight=2.0)), 4)  # 2*0.5 + 1.1
        2.1
    """
    return mle_weight * torch.as_tensor(ce, dtype=avg_logprobs.dtype) + ranking_loss(avg_logprobs, margin)


def candidate_scores(logits: torch.Tensor, labels: torch.Tensor) -> tuple:
    """Per sequence of `[M, L]` labels: (mean response-token log-prob, NaN when it has no token;
    summed negative log-likelihood; number of response tokens). Position t predicts label t+1."""
    # Shift the labels, not the logits: a view of the logits, no [M, L, vocab] copy (beyond the
    # float32 upcast of half-precision logits, as transformers' own causal-LM loss does).
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none").view(targets.shape)
    counts = targets.ne(IGNORE_INDEX).sum(-1)
    nll_sum = nll.sum(-1)  # ignored positions are 0
    mean = torch.where(counts > 0, -nll_sum / counts.clamp(min=1), torch.full_like(nll_sum, math.nan))
    return mean, nll_sum, counts


@dataclass
class TunaConfig(TrainingArguments):
    """`TrainingArguments` plus Tuna's settings (defaults: the reference's).

    Args:
        mle_weight: weight of the cross-entropy term (1.0). margin: margin per rank gap (0.1).
        ce_candidates: `"all"` (CE on every candidate, the reference) or `"best"` (the top one).
        max_length: prompt plus response tokens per candidate (512); longer ones are cut on the right.
        template: the prompt template, a scoring template name (`"alpaca"`, Tuna's).
        max_candidates: keep at most this many top-ranked candidates per row (None: all).
        dataset_num_proc: processes for tokenizing the dataset.
    """

    mle_weight: float = field(default=1.0, metadata={"help": "Weight of the cross-entropy term."})
    margin: float = field(default=0.1, metadata={"help": "Margin per rank gap of the ranking loss."})
    ce_candidates: str = field(default="all", metadata={"help": "CE on 'all' candidates (reference) or the 'best'."})
    max_length: int = field(default=512, metadata={"help": "Maximum tokens of prompt plus response."})
    template: str = field(default="alpaca", metadata={"help": "Prompt template (a scoring template name)."})
    max_candidates: Optional[int] = field(default=None, metadata={"help": "Keep the top-ranked candidates only."})
    dataset_num_proc: Optional[int] = field(default=None, metadata={"help": "Processes for tokenization."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: Tuna builds its own batch."})

    def __post_init__(self):
        super().__post_init__()
        if self.ce_candidates not in ("all", "best"):
            raise ValueError(f"ce_candidates must be 'all' or 'best', got {self.ce_candidates!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.max_candidates is not None and self.max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1 or None, got {self.max_candidates}")
        from ..prompts import get_scoring_template

        get_scoring_template(self.template)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class TunaTokenize(LazyState):  # LazyState: hashed with the package version
    """`Dataset.map` function (`batched=True`, `with_indices=True` to name a bad row by its index):
    `instruction`, optional `input`, `ranked_responses` -> `prompt_ids`, `candidate_ids`,
    `candidate_prompt_lengths` and `candidate_label_offsets`.

    Each candidate is `scoring.spans.response_span(tokenizer, prompt, response, max_length,
    eos=True)`: prompt and response tokenised as ONE string, as the reference does, so its tokens
    are those the model reads in training (SentencePiece spells "Response:The" as "Response", ":",
    "The", while "The" alone is "▁The"), plus EOS, cut on the right at `max_length`; its labels
    start at `len(tok(prompt))`, the rule IFD scores by. Stored compactly: the prompt's tokens once
    (`prompt_ids`, the prompt alone), and per candidate the joint tokens after the first
    `candidate_prompt_lengths[k]` of them that it shares with the prompt alone (`candidate_ids`).
    Where the tokenizer merges across the boundary (byte-level BPE: "Response:" + "-) ok" is
    "Response", ":-", ")", " ok"), the candidate starts at the merged token and its first
    `candidate_label_offsets[k]` tokens (":-", where the prompt's ":" stood) are context: labels
    start at ")". A candidate is empty when the prompt alone fills `max_length`.

    Example:
        >>> from datasets import Dataset
        >>> from reflectune_hf.models import load_tokenizer
        >>> from reflectune_hf.tuna.trainer import TunaTokenize
        >>> tok = load_tokenizer("smollm2-135m-instruct")
        >>> rows = Dataset.from_dict({"instruction": ["Smile."], "ranked_responses": [["Hi.", "-) ok"]]})
        >>> row = rows.map(TunaTokenize(tok), batched=True)[0]
        >>> [len(row["prompt_ids"]) - n for n in row["candidate_prompt_lengths"]], row["candidate_label_offsets"]
        ([0, 1], [0, 1])
    """

    tokenizer: Any
    template: str = "alpaca"
    max_length: int = 512
    max_candidates: Optional[int] = None

    def fingerprint_identity(self) -> dict:  # rows cached under the common-prefix rule are not reused
        return {**super().fingerprint_identity(), "labels": "response_span"}

    def __call__(self, batch: Mapping, indices: Optional[Sequence[int]] = None) -> dict:
        from ..scoring.spans import response_spans
        from .stages import format_prompt

        require_columns(batch, ["instruction", "ranked_responses"], "TunaTrainer")
        n = len(batch["instruction"])
        inputs = batch["input"] if "input" in batch else [""] * n
        prompts = [format_prompt(i or "", x or "", self.template) for i, x in zip(batch["instruction"], inputs)]
        full_prompts = self.tokenizer(prompts)["input_ids"]
        out: dict = {"prompt_ids": [], "candidate_ids": [], "candidate_prompt_lengths": [], "candidate_label_offsets": []}
        for row, (prompt, ids, ranked) in enumerate(zip(prompts, full_prompts, batch["ranked_responses"])):
            ranked = list(ranked or [])[:self.max_candidates]
            if any(not isinstance(r, str) for r in ranked):
                where = f"row {indices[row]}" if indices is not None else f"row {row} of the batch"
                raise ColumnError(f"TunaTrainer: ranked_responses of {where} must be a list of strings")
            spans = response_spans(self.tokenizer, [prompt] * len(ranked), ranked, self.max_length, eos=True)
            candidates, lengths, offsets = [], [], []
            for span in spans:
                cut = min(_common_prefix(ids, span.ids), self.max_length)
                candidates.append(span.ids[cut:])
                lengths.append(cut)
                offsets.append(min(max(span.start - cut, 0), len(span.ids) - cut))  # labels from span.start
            out["prompt_ids"].append(ids[:self.max_length])
            out["candidate_ids"].append(candidates)
            out["candidate_prompt_lengths"].append(lengths)
            out["candidate_label_offsets"].append(offsets)
        return out


@dataclass
class DataCollatorForTuna:
    """Pads a batch of rows with N ranked candidates each into one flat batch of sequences.

    Every candidate becomes a sequence `prompt_ids + candidate_ids` (right-padded), its labels the
    response tokens (prompt and padding are -100). With the columns of `TunaTokenize`, candidate k
    follows the first `candidate_prompt_lengths[k]` prompt tokens only, and its first
    `candidate_label_offsets[k]` tokens are context too, so the labels start at `len(tok(prompt))`
    of the joint tokens (`scoring.spans.response_span`); without them (older pre-tokenised data)
    the whole prompt comes first and every candidate token is a label. Rows may have different
    numbers of candidates: `candidate_index` (`[batch, N_max]`) gives each (row, rank) its sequence,
    or -1 for none, so no compute is spent on absent candidates.

    Returns `input_ids`, `attention_mask`, `labels` (`[M, L]`, M candidates in the batch) and
    `candidate_index`.

    Example:
        >>> from reflectune_hf.tuna.trainer import DataCollatorForTuna
        >>> batch = DataCollatorForTuna(pad_token_id=0)([{"prompt_ids": [5, 6], "candidate_ids": [[7, 2], [8]]},
        ...                                              {"prompt_ids": [5], "candidate_ids": [[9, 2]]}])
        >>> batch["labels"].tolist(), batch["candidate_index"].tolist()
        ([[-100, -100, 7, 2], [-100, -100, 8, -100], [-100, 9, 2, -100]], [[0, 1], [2, -1]])
        >>> merged = {"prompt_ids": [5, 6], "candidate_ids": [[67, 8, 2]], "candidate_prompt_lengths": [1],
        ...           "candidate_label_offsets": [1]}  # token 67 merged the prompt's 6 with the response
        >>> DataCollatorForTuna(pad_token_id=0)([merged])["labels"].tolist()
        [[-100, -100, 8, 2]]
    """

    pad_token_id: int
    pad_to_multiple_of: Optional[int] = None

    def __call__(self, features: Sequence[Mapping]) -> dict:
        sequences, label_rows, index = [], [], []
        for feature in features:
            prompt = list(feature["prompt_ids"])
            count = len(feature["candidate_ids"])
            cuts = feature.get("candidate_prompt_lengths") or [len(prompt)] * count
            offsets = feature.get("candidate_label_offsets") or [0] * count
            slots = []
            for candidate, cut, context in zip(map(list, feature["candidate_ids"]), cuts, offsets):
                slots.append(len(sequences))
                sequences.append(prompt[:cut] + candidate)
                label_rows.append([IGNORE_INDEX] * (len(prompt[:cut]) + context) + candidate[context:])
            index.append(slots)
        if not sequences:
            raise ValueError("DataCollatorForTuna: no row of the batch has a candidate response")
        length = max(len(s) for s in sequences)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        width = max(len(slots) for slots in index)
        return {
            "input_ids": torch.tensor([s + [self.pad_token_id] * (length - len(s)) for s in sequences]),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in sequences]),
            "labels": torch.tensor([r + [IGNORE_INDEX] * (length - len(r)) for r in label_rows]),
            "candidate_index": torch.tensor([slots + [-1] * (width - len(slots)) for slots in index]),
        }


class TunaTrainer(Trainer):
    """A `transformers.Trainer` whose loss is Tuna's, `tuna_loss(avg_logprobs, CE, margin, mle_weight)`
    (module docstring).

    Args:
        model: a model, or a name (embedded alias such as `"smollm2-135m-instruct"`, Hub id, path),
            loaded in float32: keep master weights in fp32 and set `bf16=True` (autocast) in
            `args`; half-precision weights get a warning (Tuna's lr 1e-5 / 1e-6 steps vanish in them).
        args: a `TunaConfig` (a plain `TrainingArguments` gets Tuna's defaults).
        train_dataset, eval_dataset: rows with `instruction`, optional `input` and
            `ranked_responses` (best first: from `rank_by_logprob` or `ContextualRank`), or already
            tokenized (`prompt_ids`, `candidate_ids`). Rows without any candidate are dropped with
            a warning; a row with one candidate trains CE only (mix in original Alpaca rows this way).
            A row's own system prompt (`system` column) has no place in Tuna's prompt: such rows
            train without it, and a warning counts them.
        processing_class: the tokenizer (default: the model's, with EOS as padding when it has none).
        data_collator: default `DataCollatorForTuna`.

    Logged besides `loss`: `ce_loss`, `rank_loss` and `rank_accuracy` (share of adjacent ranked
    pairs the model already scores in order).

    Example:
        >>> from datasets import Dataset
        >>> from reflectune_hf.tuna.trainer import TunaConfig, TunaTrainer
        >>> data = Dataset.from_dict({"instruction": ["Name a colour."], "ranked_responses": [["Blue.", "Car."]]})
        >>> args = TunaConfig("tuna-out", max_steps=1, use_cpu=True, report_to="none", save_strategy="no")
        >>> trainer = TunaTrainer("smollm2-135m-instruct", args=args, train_dataset=data)  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
    """

    # compute_loss returns a per-batch mean: the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, model, args: Optional[TrainingArguments] = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, data_collator=None, **kwargs):
        from ..models import load_tokenizer, resolve_model

        name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "model")
        if args is None:
            args = TunaConfig(f"{str(name).rstrip('/').split('/')[-1]}-Tuna")
        # A plain TrainingArguments works too: Tuna's settings then take TunaConfig's defaults.
        self.tuna = {f: getattr(args, f, TunaConfig.__dataclass_fields__[f].default) for f in _TUNA_FIELDS}
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM

            # fp32 master weights: set bf16=True (or fp16) in args for autocast, as the recipes do.
            model = AutoModelForCausalLM.from_pretrained(resolve_model(model), dtype=torch.float32)
        self._warn_half_precision(model, args)
        if processing_class is None:
            processing_class = load_tokenizer(model.config._name_or_path)
        if processing_class.pad_token_id is None:
            processing_class.pad_token = processing_class.eos_token
        if data_collator is None:
            data_collator = DataCollatorForTuna(processing_class.pad_token_id)
        train_dataset = self._prepare_dataset(train_dataset, processing_class, args, self.tuna, "train")
        if eval_dataset is not None:
            eval_dataset = self._prepare_dataset(eval_dataset, processing_class, args, self.tuna, "eval")
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, data_collator=data_collator, **kwargs)
        self.model_accepts_loss_kwargs = False  # no num_items_in_batch: the loss is ours
        self.can_return_loss = True
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    @staticmethod
    def _warn_half_precision(model, args: TrainingArguments) -> None:
        dtype = next((p.dtype for p in model.parameters() if p.requires_grad), torch.float32)
        if dtype in (torch.bfloat16, torch.float16):
            logger.warning("TunaTrainer: the model's trainable weights are %s: an Adam step at lr %g is below their "
                           "resolution and most weights will not move. Load the model in float32 and train with "
                           "bf16=True (autocast), as scripts/configs/tuna_*.yaml do.", dtype, args.learning_rate)

    @staticmethod
    def _prepare_dataset(dataset, tokenizer, args: TrainingArguments, tuna: dict, name: str):
        if dataset is None:
            return None
        columns = dataset.column_names
        if "system" in columns:  # TRL data with a system turn: Tuna's prompt template has no place for it
            own = sum(1 for s in dataset["system"] if s)
            if own:
                logger.warning("TunaTrainer: %d of %d %s rows have a system prompt of their own (`system` column): "
                               "Tuna's %r prompt has none, so they train without it", own, len(dataset), name,
                               tuna["template"])
        if not ("prompt_ids" in columns and "candidate_ids" in columns):
            tokenize = TunaTokenize(tokenizer, tuna["template"], tuna["max_length"], tuna["max_candidates"])
            with args.main_process_first(desc=f"Tokenizing the {name} dataset"):
                dataset = dataset.map(tokenize, batched=True, with_indices=True, remove_columns=columns,
                                      num_proc=tuna["dataset_num_proc"], desc=f"Tuna: tokenizing {name} candidates")
        empty = dataset.filter(lambda c: len(c) == 0, input_columns="candidate_ids").num_rows
        if empty:
            logger.warning("TunaTrainer: %d %s rows have no ranked response and are left out", empty, name)
            dataset = dataset.filter(lambda c: len(c) > 0, input_columns="candidate_ids")
        if len(dataset) == 0:
            raise ValueError(f"TunaTrainer: no {name} row has a ranked response to train on (see the ranking_status "
                             "column of the ranking stage)")
        full = dataset.filter(lambda c: all(len(x) == 0 for x in c), input_columns="candidate_ids").num_rows
        if full:
            logger.warning("TunaTrainer: %d %s rows have prompts of >= max_length=%d tokens: no response token "
                           "is left, they add no loss", full, name, tuna["max_length"])
        return dataset

    # The batch is Tuna's own (candidate_index is no model input): never prune its columns.
    def _remove_unused_columns(self, dataset, description=None):
        return dataset

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        return data_collator

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels, index = inputs["labels"], inputs["candidate_index"]
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        mean, nll_sum, counts = candidate_scores(outputs.logits, labels)
        # [batch, N] scores best first; absent slots (-1) read the appended NaN.
        scores = torch.cat([mean, mean.new_full((1,), math.nan)])[index]
        if self.tuna["ce_candidates"] == "best":
            chosen = index[:, 0]
            nll_sum, counts = nll_sum[chosen], counts[chosen]
        tokens = counts.sum()
        ce = nll_sum.sum() / tokens.clamp(min=1)  # 0 (kept in the graph) when nothing is left to learn
        loss = tuna_loss(scores, ce, margin=self.tuna["margin"], mle_weight=self.tuna["mle_weight"])
        mode = "train" if model.training else "eval"
        with torch.no_grad():
            rank = ranking_loss(scores, self.tuna["margin"])  # the ranking term alone, for the logs
            adjacent = torch.isfinite(scores[:, :-1]) & torch.isfinite(scores[:, 1:])
            metrics = {"ce_loss": ce, "rank_loss": rank}
            if adjacent.any():
                metrics["rank_accuracy"] = (scores[:, :-1] > scores[:, 1:])[adjacent].float().mean()
            for key, value in metrics.items():
                self._metrics[mode][key].append(self.accelerator.gather_for_metrics(value.detach()).mean().item())
        return (loss, {"avg_logprobs": scores.detach()}) if return_outputs else loss

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(v) / len(v) for key, v in self._metrics[mode].items() if v}
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()
