"""Datasets in TRL's formats, the embedded arithmetic data, and the tokenizer with the DeepSeek-V2 template."""

from .loading import BUILTIN, FORMATS, DataError, load_rows, to_dataset
from .tokenizer import CHAT_TEMPLATE, TRAINING_CHAT_TEMPLATE, default_tokenizer, ensure_chat_template

__all__ = ["BUILTIN", "CHAT_TEMPLATE", "FORMATS", "TRAINING_CHAT_TEMPLATE", "DataError", "default_tokenizer",
           "ensure_chat_template", "load_rows", "to_dataset"]
