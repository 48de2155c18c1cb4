"""Pairwise evaluation of two models on instruction test sets, judged in both orders: a thin
TRL-style wrapper around `reflectune_hf.cli.eval_job` (the job of `reflectune eval`).

    # two local models, an OpenAI-compatible judge
    python scripts/evaluate.py --test_sets vicuna koala --eval_dir ../shared/data/eval \
        --model_a ./my-sft-model --model_b smollm2-135m-instruct \
        --judge_model gpt-4o --judge_base_url https://api.openai.com/v1

    # two response files written earlier (columns instruction, response), a local judge
    python scripts/evaluate.py --responses_a a.jsonl --responses_b b.jsonl --judge_model ./judge

    # every flag can come from a YAML file too
    python scripts/evaluate.py --config eval.yaml

Prints the win / tie / lose / error table and writes `<output_dir>/<test set>.jsonl`,
`summary.json` and `judge.png`. Servers' API keys come from the environment (`OPENAI_API_KEY`).
"""

import logging

from reflectune_hf.cli.eval_job import make_parser, run_eval
from reflectune_hf.cli.main import parse_arguments


def main(config) -> dict:
    return run_eval(config)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    (eval_config,) = parse_arguments(make_parser())  # a bad flag or an inconsistent configuration: exit 2
    main(eval_config)
