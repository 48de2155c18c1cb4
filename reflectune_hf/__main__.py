"""`python -m reflectune_hf ...` is the `reflectune` command."""

from .cli import main

raise SystemExit(main())
