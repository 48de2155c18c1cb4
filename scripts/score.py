"""Score a dataset with IFD and r-IFD (the four student-model losses), on one or many processes.

Each process scores a contiguous shard (accelerate's `split_between_processes`) with
`reflectune_hf.scoring.IFDScorer`; the score columns are gathered to the main process, which adds
them to the data in the original order and writes the result. One process or several give the
same table. On CPU the cores are split between the processes.

# One process (CPU or one GPU)
```bash
python scripts/score.py --data sample --output scored.jsonl
```

# Several processes: one per GPU, or two CPU processes here
```bash
accelerate launch --num_processes 8 scripts/score.py --config scripts/configs/score.yaml --data my-org/alpaca
torchrun --nproc_per_node 2 scripts/score.py --data sample --output scored.parquet --device cpu
```

# A student served by vLLM or llama.cpp (only its tokenizer is loaded here)
```bash
python scripts/score.py --data sample --student_base_url http://127.0.0.1:8000/v1 --model HuggingFaceTB/SmolLM2-135M-Instruct
```

The output format follows the suffix of `--output`: `.jsonl`, `.json`, `.parquet`, else a
directory written with `save_to_disk`. NaN scores (see `score_status`) are written as null in JSON.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

logger = logging.getLogger("reflectune_hf.scripts.score")


@dataclass
class ScoreConfig:
    """What `scripts/score.py` scores, with which student model, and where it writes."""

    data: str = field(default="sample", metadata={"help": "'sample', a JSON/JSONL/Parquet file, a save_to_disk directory or a Hub dataset id"})
    output: str = field(default="scored.jsonl", metadata={"help": "output .jsonl/.json/.parquet file, or a directory"})
    split: str = field(default="train", metadata={"help": "split of a Hub dataset or DatasetDict"})
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "student model: embedded alias, local path or Hub id"})
    template: str = field(default="vicuna", metadata={"help": "scoring template: vicuna, alpaca, wizardlm or plain"})
    max_length: int = field(default=2048, metadata={"help": "the reference's max_length (right truncation)"})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16"})
    device: Optional[str] = field(default=None, metadata={"help": "cpu or cuda; default: each process's accelerate device"})
    max_tokens_per_batch: Optional[int] = field(default=None, metadata={"help": "padded tokens per forward pass (default: 16384 on GPU, 1024 on CPU)"})
    batch_size: int = field(default=256, metadata={"help": "rows per map batch"})
    student_base_url: Optional[str] = field(default=None, metadata={"help": "score with the student served by vLLM or llama.cpp at this URL (ends in /v1); --model is then the tokenizer"})
    student_server_model: Optional[str] = field(default=None, metadata={"help": "the student's name on that server (default: --model)"})
    student_backend: str = field(default="auto", metadata={"help": "auto, vllm, llamacpp or echo (OpenAI-legacy)"})
    student_max_concurrency: int = field(default=16, metadata={"help": "served student: requests in flight per process"})


def write(ds, path: str) -> None:
    """Write `ds` to `path` in the format its suffix names (a directory otherwise)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".jsonl":
        ds.to_json(path, lines=True, force_ascii=False)
    elif suffix == ".json":
        ds.to_json(path, lines=False, force_ascii=False)
    elif suffix == ".parquet":
        ds.to_parquet(path)
    else:
        ds.save_to_disk(path)


def main(config: ScoreConfig):
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from reflectune_hf.data import load_data
    from reflectune_hf.scoring import SCORE_COLUMNS, IFDScorer

    on_cpu = config.device == "cpu" or (config.device is None and not torch.cuda.is_available())
    state = PartialState(cpu=on_cpu)
    with state.main_process_first():
        ds = load_data(config.data, split=config.split)
    scorer = IFDScorer(
        config.model, config.template, config.max_length, config.dtype,
        device="cpu" if on_cpu else (config.device or str(state.device)),
        max_tokens_per_batch=config.max_tokens_per_batch,
        num_threads=max(1, len(os.sched_getaffinity(0)) // state.num_processes) if on_cpu else None,
        base_url=config.student_base_url, server_model=config.student_server_model,
        student_backend=config.student_backend, max_concurrency=config.student_max_concurrency,
    )
    with state.split_between_processes(list(range(len(ds)))) as indices:
        shard = ds.select(indices).select_columns([c for c in ("instruction", "input", "output") if c in ds.column_names])
        scored = shard.map(scorer, batched=True, batch_size=config.batch_size, remove_columns=shard.column_names,
                           desc=f"Scoring (process {state.process_index})")
        scores = scored.to_list()
    if state.num_processes > 1:
        scores = gather_object(scores)  # concatenated in process order, i.e. the original row order
    if state.is_main_process:
        for name in SCORE_COLUMNS:
            ds = ds.remove_columns(name) if name in ds.column_names else ds
            ds = ds.add_column(name, [row[name] for row in scores])
        write(ds, config.output)
        ok = sum(s == "ok" for s in ds["score_status"])
        logger.info("Scored %d rows (%d ok) with %d process(es); wrote %s", len(ds), ok, state.num_processes, config.output)
    state.wait_for_everyone()
    return ds if state.is_main_process else None


def make_parser(subparsers: argparse._SubParsersAction = None, prog: str = None):
    from trl import TrlParser

    if subparsers is not None:
        return subparsers.add_parser("score", help="IFD / r-IFD scores", dataclass_types=(ScoreConfig,))
    return TrlParser((ScoreConfig,), prog=prog)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    (config,) = make_parser().parse_args_and_config()
    main(config)
