"""Reproductions of published results, run from the repository root (see README.md).

    python -m experiments.<slug>.run --config=experiments/<slug>/config.py:full
"""
