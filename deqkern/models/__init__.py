"""Reference models built on deqkern's layers."""

from deqkern.models.charlm import CharLM, CharLMConfig, batches, corpus
from deqkern.models.train import TrainResult, train

__all__ = ["CharLM", "CharLMConfig", "TrainResult", "batches", "corpus", "train"]
