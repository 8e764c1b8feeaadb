"""Scoring a model: next-token accuracy by entropy tier (``tier_metrics.py``, what validation and test log), and the
``compare`` command (``compare.py``, ``compare_rows.py``, ``charts.py``), which runs ``validate`` for several configs."""
