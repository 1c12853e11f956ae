"""Reference models built on deqkern's layers."""

from deqkern.models.charlm import CharLM, CharLMConfig, batches, corpus, train

__all__ = ["CharLM", "CharLMConfig", "batches", "corpus", "train"]
