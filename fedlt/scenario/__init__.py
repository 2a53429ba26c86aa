"""Scenarios: the TOML schema, loading with overrides, and validation at the boundary."""
