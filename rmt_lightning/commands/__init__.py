"""Commands beside ``cli.py`` that run models through it: ``compare`` (the paper's tables, row by row)."""
