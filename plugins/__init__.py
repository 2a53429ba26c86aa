"""fedlt's built-in remedies, registered in the ``fedlt.plugins`` entry-point group exactly as a
third-party distribution registers its own (see pyproject.toml). Importable as ``fedlt_plugins``.
"""
