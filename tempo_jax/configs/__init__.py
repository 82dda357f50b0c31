"""Experiment configs (ml_collections `get_config(arg)`), shipped inside the package so entry
points find them from any directory; `configs/` at the repo root links here."""
