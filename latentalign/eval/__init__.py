"""Evaluation: held-out exact-match accuracy of chat models (more tasks and reports build on it)."""

from .accuracy import exact_match, generate_completions

__all__ = ["exact_match", "generate_completions"]
