"""Video data pipeline: frame processing (Qwen2.5-VL layout) and SAA frame allocation."""
