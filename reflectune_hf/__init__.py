"""reflectune_hf: Reflection-Tuning (data recycling for instruction tuning), the Hugging Face way.

Each stage of the method is a callable for `Dataset.map` / `Dataset.filter`; configs are
dataclasses; models and oracles load lazily so datasets' cache serves repeated runs.

Example:
    >>> import reflectune_hf
    >>> ds = reflectune_hf.load_sample()
    >>> len(ds)
    40
"""

__version__ = "0.1.0"

from .data import add_ids, load_data, load_sample, to_alpaca  # noqa: E402
from .models import load_causal_lm, resolve_model  # noqa: E402
from .scoring import IFDScorer  # noqa: E402

__all__ = ["__version__", "add_ids", "load_causal_lm", "load_data", "load_sample", "resolve_model", "to_alpaca"]
__all__ += ["IFDScorer"]
