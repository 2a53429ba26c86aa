"""Foundations every layer uses: seeding, plain-data checks, registries, provenance, memory."""
