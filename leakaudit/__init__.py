"""leakaudit: measure what a fine-tuned language model leaks about the data it was tuned on."""

__version__ = "0.1.0"
