"""SelectIT's rating math (REFERENCE.md §9): pure numpy, vectorised over leading dimensions,
NaN in, NaN out. `reflectune_hf.scoring.selectit` runs the models and re-exports these functions.

- token level: `P' = P / sum(P)`, `S_base = argmax(P') + 1`,
  `S_token = S_base * sum_i |P'_i - P'_max| / (N - 1)` with N = 5 ratings (range [0, 5]);
- sentence level: `S_sent = mean / (1 + alpha * std)` over the K rating prompts;
- model level: `S_model = sum_m (params_m / sum params) * S_sent_m`.

Example:
    >>> from reflectune_hf.scoring.selectit_math import sentence_scores, token_scores
    >>> round(float(sentence_scores(token_scores([[0.1, 0.2, 0.4, 0.2, 0.1]] * 2))), 6)
    0.75
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

RATINGS = ("1", "2", "3", "4", "5")
FORMULAS = ("paper", "reference")


def rating_distribution(probs: np.ndarray, rating_ids: Sequence[Sequence[int]]) -> np.ndarray:
    """Probabilities of the 5 ratings from next-token probabilities `[..., vocab]`.

    A rating spelled by several single tokens ("1" and " 1") gets the sum of their
    probabilities: they are the same answer, and the sum is the model's probability of it.

    Example:
        >>> import numpy as np
        >>> from reflectune_hf.scoring.selectit_math import rating_distribution
        >>> rating_distribution(np.array([0.1, 0.2, 0.3, 0.1, 0.1, 0.05, 0.15]),
        ...                     [[0], [1, 6], [2], [3], [4]]).round(2).tolist()
        [0.1, 0.35, 0.3, 0.1, 0.1]
    """
    probs = np.asarray(probs, dtype=np.float64)
    return np.stack([probs[..., list(ids)].sum(axis=-1) for ids in rating_ids], axis=-1)


def normalize_ratings(p: np.ndarray, formula: str = "paper") -> np.ndarray:
    """`P / sum(P)` (paper) or `softmax(P / sum(P))` (reference code) over the last axis.

    Example:
        >>> from reflectune_hf.scoring.selectit_math import normalize_ratings
        >>> normalize_ratings([0.1, 0.1, 0.2, 0.05, 0.05]).tolist()
        [0.2, 0.2, 0.4, 0.1, 0.1]
    """
    if formula not in FORMULAS:
        raise ValueError(f"formula must be one of {FORMULAS}, got {formula!r}")
    p = np.asarray(p, dtype=np.float64)
    total = p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(total > 0, p / total, np.nan)
        if formula == "reference":
            e = np.exp(q)
            q = e / e.sum(axis=-1, keepdims=True)
    return q


def token_scores(p: np.ndarray, formula: str = "paper", k: Optional[int] = None) -> np.ndarray:
    """Token-level scores `S_base * sum_i |P'_i - P'_max| / (N - 1)` of rating probabilities
    `[..., N=5]`; NaN where the probabilities are not finite or sum to zero.

    With `formula="reference"` and the prompt count `k`, the spread is the reference code's:
    summed over the first `k` ratings only and divided by `k - 1` (the same as the paper's at
    its default k = 5; NaN at k = 1, where the reference divides by zero).

    Example:
        >>> from reflectune_hf.scoring.selectit_math import token_scores
        >>> round(float(token_scores([0.1, 0.2, 0.4, 0.2, 0.1])), 6)  # rating 3, spread (.3+.2+.2+.3)/4
        0.75
    """
    q = normalize_ratings(p, formula)
    n = q.shape[-1]
    ok = np.isfinite(q).all(axis=-1)
    q0 = np.where(ok[..., None], q, 0.0)
    best = q0.argmax(axis=-1)
    top = np.take_along_axis(q0, best[..., None], axis=-1)
    if formula == "reference" and k is not None and k != n:
        if k < 2:
            return np.full(ok.shape, np.nan)
        spread = (top - q0[..., :k]).sum(axis=-1) / (k - 1)
    else:
        spread = np.abs(q0 - top).sum(axis=-1) / (n - 1)
    return np.where(ok, (best + 1) * spread, np.nan)


def sentence_scores(token: np.ndarray, alpha: float = 0.2) -> np.ndarray:
    """Sentence-level scores `mean / (1 + alpha * std)` over the last axis (the K prompts).

    Example:
        >>> from reflectune_hf.scoring.selectit_math import sentence_scores
        >>> round(float(sentence_scores([1.0, 2.0, 3.0, 4.0, 5.0], alpha=0.2)), 6)
        2.338556
    """
    token = np.asarray(token, dtype=np.float64)
    return token.mean(axis=-1) / (1.0 + alpha * token.std(axis=-1))


def model_weights(param_counts: Sequence[int]) -> np.ndarray:
    """The model-level weights `params_m / sum(params)`.

    Example:
        >>> from reflectune_hf.scoring.selectit_math import model_weights
        >>> model_weights([7, 13]).tolist()
        [0.35, 0.65]
    """
    counts = np.asarray(param_counts, dtype=np.float64)
    if counts.ndim != 1 or len(counts) == 0 or (counts <= 0).any():
        raise ValueError(f"parameter counts must be positive, got {list(param_counts)}")
    return counts / counts.sum()


def model_scores(sentence: np.ndarray, param_counts: Sequence[int]) -> np.ndarray:
    """Model-level scores: sentence scores `[..., n_models]` weighted by parameter counts.

    Example:
        >>> from reflectune_hf.scoring.selectit_math import model_scores
        >>> round(float(model_scores([2.0, 4.0], [135, 270])), 6)
        3.333333
    """
    return np.asarray(sentence, dtype=np.float64) @ model_weights(param_counts)
