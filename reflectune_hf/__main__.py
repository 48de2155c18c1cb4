"""`python -m reflectune_hf ...` is the `reflectune` command."""

from .cli.main import run

run()
