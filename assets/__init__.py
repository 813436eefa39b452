"""`mmstack.assets`: package data (the embedded demo model, example images, small eval sets)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent
