"""The model side of a step: loading models (hub, folder, built-in), the prompt format, forward passes with shared
prompts, the key/value cache and shared-prompt attention, and budget-capped group generation (``generation.py``)."""
