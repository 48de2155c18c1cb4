"""Every docstring example of the package runs as written (the HF-style "Example:" sections)."""

import doctest
import importlib
import pkgutil

import pytest

import reflectune_hf

MODULES = sorted(info.name for info in pkgutil.walk_packages(reflectune_hf.__path__, "reflectune_hf.")
                 if not info.name.endswith("__main__"))


def test_every_module_is_found():
    assert {"reflectune_hf.data", "reflectune_hf.publishing.card", "reflectune_hf.oracles.llamacpp_local",
            "reflectune_hf.cli.eval_job"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed (run it with -s)"
