"""IFD / r-IFD scoring on one or many processes: the multi-process form of `reflectune score`
(same `ScoreConfig`, same output folder), behind `scripts/score.py`.

Each process scores a contiguous shard of every split (accelerate's `split_between_processes`)
with `scoring.ifd.IFDScorer`; the score columns are gathered to the main process, which adds them
to the data in the original row order and writes the folder (`jobs.publish`: data, card, plots).
One process or several give the same table. On CPU the cores are split between the processes.

    torchrun --nproc_per_node 2 scripts/score.py --data sample --output_dir scored --device cpu
    accelerate launch --num_processes 8 scripts/score.py --data my-org/alpaca --dtype bfloat16 --output_dir scored

Example (Python, one process):
    >>> from reflectune_hf.cli.configs import ScoreConfig
    >>> from reflectune_hf.cli.score_job import run_score_sharded
    >>> scored = run_score_sharded(ScoreConfig(data="sample", limit=4, output_dir="scored"))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os

from .configs import ScoreConfig

logger = logging.getLogger(__name__)
TEXT_COLUMNS = ("instruction", "input", "output")


def _score_split(ds, scorer, config: ScoreConfig, state):
    """`ds` with the score columns, this process scoring its shard (all rows gathered on the main process)."""
    from accelerate.utils import gather_object

    from ..data import add_empty_columns
    from ..scoring.ifd import SCORE_COLUMNS, map_scores

    if len(ds) == 0:  # nothing to score or gather: the typed score columns with 0 rows (map would add none)
        return add_empty_columns(ds.remove_columns([c for c in SCORE_COLUMNS if c in ds.column_names]),
                                 scorer.output_features)
    with state.split_between_processes(list(range(len(ds)))) as indices:
        shard = ds.select(indices).select_columns([c for c in TEXT_COLUMNS if c in ds.column_names])
        # map_scores: rows whose served request failed are scored again when the datasets cache replays them
        scored = map_scores(shard, scorer, batch_size=config.score_batch_size, remove_columns=shard.column_names,
                            desc=f"Scoring (process {state.process_index})")
        scores = scored.to_list()
    if state.num_processes > 1:
        scores = gather_object(scores)  # concatenated in process order, i.e. the original row order
    for name in SCORE_COLUMNS:
        ds = ds.remove_columns(name) if name in ds.column_names else ds
        ds = ds.add_column(name, [row[name] for row in scores])
    return ds


def run_score_sharded(config: ScoreConfig):
    """Score every split of `config.data` on the processes of this launch (`torchrun`,
    `accelerate launch`, or just this one) and write `config.output_dir` from the main process.
    Returns the scored data on the main process, None on the others."""
    import torch
    from accelerate import PartialState
    from datasets import DatasetDict

    from ..scoring.ifd import IFDScorer
    from .jobs import card_context, every_split, load_input, publish

    on_cpu = config.device == "cpu" or (config.device is None and not torch.cuda.is_available())
    state = PartialState(cpu=on_cpu)
    with state.main_process_first():
        data = every_split(load_input(config), config, "score")
    scorer = IFDScorer(
        config.student_model, config.template, config.max_length, config.dtype,
        device="cpu" if on_cpu else (config.device or str(state.device)),
        max_tokens_per_batch=config.max_tokens_per_batch,
        num_threads=max(1, len(os.sched_getaffinity(0)) // state.num_processes) if on_cpu else None,
        base_url=config.student_base_url, server_model=config.student_server_model,
        student_backend=config.student_backend, max_concurrency=config.student_max_concurrency,
    )
    splits = dict(data) if isinstance(data, DatasetDict) else {"train": data}
    scored = {name: _score_split(ds, scorer, config, state) for name, ds in splits.items()}
    result = DatasetDict(scored) if isinstance(data, DatasetDict) else scored["train"]
    if state.is_main_process:
        out = publish(config, result, card_context(config, data=data))
        rows = sum(len(ds) for ds in scored.values())
        ok = sum(s == "ok" for ds in scored.values() for s in ds["score_status"])
        logger.info("Scored %d rows (%d ok) with %d process(es); wrote %s", rows, ok, state.num_processes, out)
    state.wait_for_everyone()
    return result if state.is_main_process else None


def make_parser(subparsers=None, prog: str | None = None):
    """`ScoreConfig`'s flags (the same as `reflectune score`), grouped."""
    from .arguments import CommandParser

    if subparsers is not None:
        return subparsers.add_parser("score", help="IFD / r-IFD scores", dataclass_types=(ScoreConfig,))
    return CommandParser((ScoreConfig,), prog=prog, description="IFD / r-IFD columns on every split, on one or "
                                                                 "many processes")
