"""llama.cpp's log lines (model loading, buffer sizes, a line per tensor of a re-encode) routed to
this module's logger at DEBUG, or kept for a one-line error, instead of printed to stderr.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

logger = logging.getLogger(__name__)


_LOG_CALLBACK = None
_QUIET_LOCK = threading.RLock()
_quiet_lines: Optional[list] = None  # llama.cpp log lines of the `quiet_c_output` block running now


def route_llama_logs(llama_cpp) -> None:
    """Send llama.cpp's log lines (model loading, buffer sizes) to this module's logger at DEBUG
    instead of stderr, or instead of llama-cpp-python's callback, which prints them to
    `sys.stderr` (llama.cpp's log callback is process-wide; set once); inside
    `quiet_c_output` they are kept for its `CapturedOutput` instead."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        def forward(level, text, user_data):
            try:
                line = text.decode("utf-8", "replace")
                if _quiet_lines is not None:
                    _quiet_lines.append(line)
                else:
                    logger.debug("llama.cpp: %s", line.rstrip())
            except Exception:  # noqa: BLE001 - never raise into C
                pass

        _LOG_CALLBACK = llama_cpp.llama_log_callback(forward)
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


@dataclass
class CapturedOutput:
    """llama.cpp's log lines of a `quiet_c_output` block, readable once the block has ended."""

    text: str = ""

    def tail(self, lines: int = 3) -> str:
        """The last `lines` non-empty lines, joined on one line (for a one-line error)."""
        kept = [line.strip() for line in self.text.splitlines() if line.strip()]
        return " | ".join(kept[-lines:])


@contextmanager
def quiet_c_output() -> Iterator[CapturedOutput]:
    """Run a llama.cpp call with its log lines (model loading, a line per tensor of a re-encode)
    kept instead of logged: yields a `CapturedOutput`, filled when the block ends, to show when
    the call failed and drop when it worked. llama.cpp writes these lines through its log
    callback (`route_llama_logs`, set before the call), not to the process's descriptors, so
    nothing process-wide is redirected: measured, a re-encode and a model load with the callback
    routed write nothing to file descriptors 1 or 2.

    Blocks run one at a time (a lock; a nested block captures its own part).

    Example:
        >>> import llama_cpp
        >>> from reflectune_hf.oracles.llamacpp_logs import quiet_c_output, route_llama_logs
        >>> route_llama_logs(llama_cpp)
        >>> with quiet_c_output() as output:
        ...     pass
        >>> output.tail()
        ''
    """
    global _quiet_lines
    output = CapturedOutput()
    with _QUIET_LOCK:
        outer, _quiet_lines = _quiet_lines, []
        try:
            yield output
        finally:
            lines, _quiet_lines = _quiet_lines, outer
            output.text = "".join(lines)
