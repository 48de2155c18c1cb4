"""The package is the product: a wheel of this checkout, installed into a folder outside it, runs
the `reflectune` commands and renders a card without the repository's scripts/ or cards/."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site folder, a cwd outside the checkout, env with only the site folder on PYTHONPATH)."""
    root = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(root / "dist"), str(REPO)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (root / "dist").glob("reflectune_hf-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "reflectune_hf/cards/dataset_card.md" in names and "reflectune_hf/cards/model_card.md" in names
    assert "reflectune_hf/chat_templates/vicuna_v1.1.jinja" in names and not any(n.startswith("scripts/") for n in names)
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                              str(root / "site"), str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    cwd = root / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(root / "site"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               REFLECTUNE_HF_CACHE=str(root / "cache"))
    return root / "site", cwd, env


def python(installed, *args, timeout=300) -> subprocess.CompletedProcess:
    _, cwd, env = installed
    # -P: no script directory or cwd on sys.path, so only the installed copy can be imported
    return subprocess.run([sys.executable, "-P", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_commands_run_from_an_installed_wheel(installed):
    site = installed[0]
    where = python(installed, "-c", "import reflectune_hf; print(reflectune_hf.__file__)")
    assert where.returncode == 0 and Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr
    for command, needle in (("sft", "--model_name_or_path"), ("eval", "--judge_model"), ("recycle", "--oracle_model"),
                            ("tuna", "--oracle_model")):
        out = python(installed, "-m", "reflectune_hf", command, "--help")
        assert out.returncode == 0 and needle in out.stdout, (command, out.stderr[-2000:])
    # the console script's entry point (setup.cfg: reflectune = reflectune_hf.cli.main:run)
    out = python(installed, "-c", "import sys; sys.argv = ['reflectune', '--help']; from reflectune_hf.cli.main import run; run()")
    assert out.returncode == 0 and "sft" in out.stdout and "eval" in out.stdout
    # sft parses its arguments and applies the packaged Vicuna template from the installed copy
    code = ("from reflectune_hf.cli.main import command_parser; "
            "a = command_parser('sft').parse_args_and_config(['--output_dir', 'o'])[1]; print(a.chat_template_path)")
    out = python(installed, "-c", code)
    assert out.returncode == 0 and Path(out.stdout.strip()).is_relative_to(site), out.stderr[-2000:]


@pytest.mark.slow
def test_a_card_renders_from_an_installed_wheel(installed):
    site, cwd, _ = installed
    code = ("from reflectune_hf import load_sample; from reflectune_hf.publishing.hub import save_local; "
            "from reflectune_hf.utils import card_template; print(card_template('dataset_card.md')); "
            "save_local(load_sample().select(range(4)), 'out', card_context={'source_dataset': 'sample'})")
    out = python(installed, "-c", code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert Path(out.stdout.strip().splitlines()[-1]).is_relative_to(site)
    card = (cwd / "out" / "README.md").read_text()
    assert card.startswith("---\n") and "source_datasets:\n- sample" in card
    assert "# Instruction data" in card and "{{" not in card  # the template, rendered (no oracle: not "recycled")
