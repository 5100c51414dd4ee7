"""biogpt-cli: a compact BioGPT that gives the reference's tokens, faster, from the command line."""

from .cache import KVCache
from .config import BioGptConfig
from .errors import BioGptError, CheckpointError, ConfigError, InputError, VocabularyError
from .model import (
    BioGptForCausalLM,
    BioGptForSequenceClassification,
    BioGptForTokenClassification,
    BioGptModel,
    BioGptOutput,
)
from .tokenizer import BioGptTokenizer

__all__ = [
    "BioGptConfig",
    "BioGptError",
    "BioGptForCausalLM",
    "BioGptForSequenceClassification",
    "BioGptForTokenClassification",
    "BioGptModel",
    "BioGptOutput",
    "BioGptTokenizer",
    "CheckpointError",
    "ConfigError",
    "InputError",
    "KVCache",
    "VocabularyError",
]
