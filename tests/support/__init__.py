"""Test fixtures that are not library code (importable as ``support`` thanks to tests/conftest.py)."""
