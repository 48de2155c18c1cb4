"""Publishing: statistics and plots of a run (`report`), the dataset card (`card`), `save_local`
and `push_to_hub` (`hub`), the output folder's layout (`outputs`)."""

from .hub import push_to_hub, save_local
from .report import plot_summary, summarize

__all__ = ["plot_summary", "push_to_hub", "save_local", "summarize"]
