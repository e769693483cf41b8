"""Privacy attacks on language models."""
