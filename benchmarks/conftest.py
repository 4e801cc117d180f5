"""Collect benchmarks/bench_*.py (pytest collects test_*.py by default): `pytest benchmarks/ --benchmark-only`."""
import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
