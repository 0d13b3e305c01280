"""Errors of the inference side that the CLI turns into exit code 2 (kept free of heavy imports)."""


class InputError(ValueError):
    """Bad user input to the inference pipeline or its CLI (exit code 2)."""


class BundleError(InputError):
    """A bundle that is missing, incomplete, damaged, or whose stages do not fit together."""
