"""The package's version (the same as pyproject.toml's, which Nix reads)."""

__version__ = "0.1.0"
