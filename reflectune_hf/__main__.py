"""`python -m reflectune_hf ...` is the `reflectune` command."""

from .cli.main import main

raise SystemExit(main())
