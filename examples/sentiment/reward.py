"""The ground-truth reward: VADER's compound sentiment score (-1 very negative .. +1 very positive)."""
from __future__ import annotations

from functools import lru_cache

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer


@lru_cache(maxsize=1)
def _analyzer() -> SentimentIntensityAnalyzer:
    return SentimentIntensityAnalyzer()  # reads the lexicon shipped inside the package


def sentiment(texts: list[str]) -> list[float]:
    """VADER compound score of each text."""
    analyzer = _analyzer()
    return [analyzer.polarity_scores(t)["compound"] for t in texts]
