"""`mmstack.apps`: the command line, the web demo, batch OCR / chart parsing, fine-tuning, synthetic data."""
