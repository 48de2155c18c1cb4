"""Checks of a row's text before and after an oracle stage: is there anything to send, can it be
sent, and did a compression keep the row's input.

- `skip_reason(*texts)`: why a row gets no request: `"invalid_text"` when a text cannot be
  encoded as UTF-8 (a lone surrogate such as `"\\ud800"`: no server, cache or tokenizer takes it),
  `"empty_input"` when a text is empty, None or only whitespace; `""` when the row can be sent.
  The oracle stages (`reflectune_hf.reflection.stages`) send nothing for such a row and keep it, and the
  extraction (`reflectune_hf.reflection.extract`) gives it that status.
- `input_survives(input, instruction)`: the rule that tells a compression that kept its input
  from one that lost it (status `input_lost` in `CompressInstruction`).

Example:
    >>> from reflectune_hf.reflection.row_checks import input_survives, skip_reason
    >>> skip_reason("Name a bird.", "  "), skip_reason("Name a bird.", "Robin")
    ('empty_input', '')
    >>> input_survives("Good morning", "Translate 'Good morning' to French.")
    True
    >>> input_survives("The quick brown fox jumps over the lazy dog.", "Translate the sentence.")
    False
"""

from __future__ import annotations

import re
from typing import Optional

SKIP_STATUSES = ("empty_input", "invalid_text")

# Function words that carry nothing of an input ("the", "given", "input"): left out of the count.
_STOPWORDS = frozenset(
    "a an the and or of to in on for with at by from is are was were be been it its this that these those as into "
    "about your you i my we our their his her he she they them given following input".split()
)
_WORD = re.compile(r"\w+")
# "Topic:", "Movie Name:" opening a line: a label a good compression rewrites ("an essay about ...").
_LABEL = re.compile(r"^[ \t]*[\w ]{1,30}:", re.M)
STEM = 4  # letters of a word that must match: "nurse" ~ "nursing", "cry" ~ "crying"
MIN_KEPT = 0.5  # share of the input's content words that must survive


def is_valid_text(text: Optional[str]) -> bool:
    """False when `text` cannot be encoded as UTF-8 (a lone surrogate), else True (None is valid)."""
    if not text:
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def skip_reason(*texts: Optional[str]) -> str:
    """`"invalid_text"`, `"empty_input"` or `""` (see the module docstring); invalid text wins."""
    if not all(is_valid_text(t) for t in texts):
        return "invalid_text"
    if any(not (t or "").strip() for t in texts):
        return "empty_input"
    return ""


def _content_words(text: str, drop_labels: bool = False) -> list[str]:
    if drop_labels:
        text = _LABEL.sub(" ", text)
    return [w for w in _WORD.findall(text.casefold()) if w not in _STOPWORDS]


def input_survives(input: str, instruction: str) -> bool:
    """True when the compressed `instruction` still holds the row's `input`.

    The rule: the input appears verbatim (case and spacing aside), or at least half
    (`MIN_KEPT`) of its content words (word tokens, case-folded, without function words and
    without "Label:" prefixes opening a line) match a word of the instruction on their first four
    letters (`STEM`; a shorter word matches as a prefix). On the 579 rows with an input of the
    published Alpaca compression (`cherry_alpaca_5_percent_compressed.json`), 510 pass; the 69
    that fail are placeholder inputs ("No input", "<noinput>"), inputs the reference swapped with
    another row's, and compressions that dropped the text, a URL or most of a poem. A stricter
    rule (90% of the exact words) rejects good rewrites such as "Topic: Time Management" ->
    "Write an essay about time management".

    Example:
        >>> from reflectune_hf.reflection.row_checks import input_survives
        >>> input_survives("profession: Nurse", "What are the benefits of joining the nursing profession?")
        True
        >>> input_survives("Theme: Friendship\\nCharacter: Cowboy\\nSetting: Mountain",
        ...                "Write a creative story about friendship, set in the mountains, with a cowboy.")
        True
    """
    def norm(text: str) -> str:
        return " ".join(text.casefold().split())

    if norm(input) in norm(instruction):
        return True
    words = _content_words(input, drop_labels=True) or _content_words(input)
    if not words:
        return False  # only punctuation or function words, and not verbatim
    prefixes = {w[:k] for w in _WORD.findall(instruction.casefold()) for k in range(1, STEM + 1)}
    kept = sum(w[:STEM] in prefixes for w in words)
    return kept >= MIN_KEPT * len(words)
