"""Score a dataset with IFD and r-IFD (the four student-model losses), on one or many processes: a
thin TRL-style wrapper around `reflectune_hf.cli.score_job` (the multi-process form of
`reflectune score`: the same flags, the same output folder).

Each process scores a contiguous shard of every split; the main process gathers the scores in the
original row order and writes `--output_dir` (data, card, plots). One process or several give the
same table. On CPU the cores are split between the processes.

# One process (CPU or one GPU)
```bash
python scripts/score.py --data sample --output_dir scored
```

# Several processes: one per GPU, or two CPU processes here
```bash
accelerate launch --num_processes 8 scripts/score.py --data my-org/alpaca --dtype bfloat16 --output_dir scored
torchrun --nproc_per_node 2 scripts/score.py --data sample --output_dir scored --device cpu
```

# A student served by vLLM or llama.cpp (only its tokenizer is loaded here)
```bash
python scripts/score.py --data sample --output_dir scored --student_model HuggingFaceTB/SmolLM2-135M-Instruct \
    --student_base_url http://127.0.0.1:8000/v1
```

The folder holds `arrow/` (`load_from_disk`), `data/<split>-*.parquet`, the card and plots, as
`reflectune score` writes it.
"""

import logging

from reflectune_hf.cli.main import parse_arguments
from reflectune_hf.cli.score_job import make_parser, run_score_sharded


def main(config):
    return run_score_sharded(config)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    (config,) = parse_arguments(make_parser())  # a bad flag or value: one line, exit 2
    main(config)
