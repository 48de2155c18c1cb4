"""Pairwise evaluation of two models on instruction test sets, judged in both orders
(REFERENCE.md §11); the `reflectune eval` job as a TRL-style script.

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

from __future__ import annotations

import argparse
import logging


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl import TrlParser

    from reflectune_hf.cli.eval_job import EvalConfig

    if subparsers is not None:
        return subparsers.add_parser("eval", help="Judge two models' answers pairwise", dataclass_types=(EvalConfig,))
    return TrlParser((EvalConfig,), prog=prog, description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)


def main(config) -> dict:
    from reflectune_hf.cli.eval_job import run_eval

    return run_eval(config)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = make_parser()
    try:
        (eval_config,) = parser.parse_args_and_config()
    except ValueError as err:  # an inconsistent configuration: say so like any bad flag
        parser.error(str(err))
    main(eval_config)
