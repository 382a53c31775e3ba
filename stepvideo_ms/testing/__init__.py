"""Test tooling shipped with the package (like numpy.testing): nothing here runs in production."""
