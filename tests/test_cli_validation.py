"""Input validation of the `reflectune` commands: bad values exit 2 with one line, before any work."""

from __future__ import annotations

import pytest

from reflectune_hf.cli import main as cli
from reflectune_hf.cli.configs import EstimateConfig, RecycleConfig


def _one_line_exit_2(argv, capsys) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()[-1:]) == 1 and "Traceback" not in err
    return err.splitlines()[-1]


@pytest.mark.parametrize("flags, message", [
    (["--input_price", "nan", "--output_price", "1"], "input_price must be a finite number >= 0, got nan"),
    (["--input_price", "1", "--output_price", "inf"], "output_price must be a finite number >= 0, got inf"),
    (["--temperature", "nan"], "temperature must be a finite number >= 0, got nan"),
])
def test_nan_and_inf_are_refused(flags, message, capsys):
    err = _one_line_exit_2(["estimate", "--oracle_model", "m", "--limit", "1", *flags], capsys)
    assert message in err


@pytest.mark.parametrize("values, message", [
    ({"limit": 1.5}, "limit must be an integer >= 1, got 1.5"),
    ({"limit": True}, "limit must be an integer >= 1, got True"),
    ({"max_new_tokens": 64.0}, "max_new_tokens must be an integer >= 1, got 64.0"),
    ({"max_concurrency": 2.5}, "max_concurrency must be an integer >= 1, got 2.5"),
    ({"max_length": 512.0}, "max_length must be an integer >= 2, got 512.0"),
    ({"timeout": float("inf")}, "timeout must be a finite number > 0, got inf"),
    ({"requests_per_minute": float("nan")}, "requests_per_minute must be a finite number > 0, got nan"),
    ({"temperature": float("-inf")}, "temperature must be a finite number >= 0, got -inf"),
])
def test_python_configs_refuse_non_integers_and_non_finite_numbers(values, message):
    with pytest.raises(ValueError) as err:
        RecycleConfig(oracle_model="m", **values)
    assert str(err.value) == message


def test_finite_values_and_integers_still_pass():
    config = RecycleConfig(oracle_model="m", limit=3, timeout=30, temperature=0.7, requests_per_minute=60.5)
    assert (config.limit, config.timeout, config.temperature) == (3, 30, 0.7)
    assert EstimateConfig(oracle_model="m", input_price=0, output_price=0.6).output_price == 0.6
