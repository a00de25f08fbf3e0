"""The package version, recorded in compiled artifacts (kept here so the backend need not import the package root)."""

__version__ = "0.1.0"
