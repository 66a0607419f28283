"""Batch inference through Lightning's ``predict`` loop: generation (:class:`Generator`) and scoring
(:class:`Scorer`), both written by :class:`JsonlPredictionWriter`."""

from rlhf_lightning.inference.generate import Generator
from rlhf_lightning.inference.score import Scorer
from rlhf_lightning.inference.writer import JsonlPredictionWriter

__all__ = ["Generator", "JsonlPredictionWriter", "Scorer"]
