"""leakaudit: measure what a fine-tuned language model leaks about the data it was tuned on."""

__version__ = "0.2.0"


def package_version(name: str) -> str:
    """The installed version of a distribution, or "not installed": results record what made them."""
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
