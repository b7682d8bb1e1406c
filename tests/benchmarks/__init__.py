import importlib
import os
import sys

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'benchmarks')


def import_benchmark(name):
    """benchmarks/<name>.py as a module, imported the way the scripts import each other (benchmarks/ on sys.path)."""
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    return importlib.import_module(name)
