"""Scoring a model, what validation and test log: next-token accuracy by entropy tier (``tier_metrics.py``),
answer accuracy on held-out questions (``answer_metrics.py``), and the intervals and charts of a comparison
(``charts.py``). The ``compare`` command that runs them for several configs is in ``commands/``."""
