"""Grounding answers: parsing, IoU and the metrics (ours and the official QVHighlights ones)."""
