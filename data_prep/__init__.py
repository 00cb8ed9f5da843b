"""Offline converters from the official dataset releases to the files `pqae.data` loads."""
