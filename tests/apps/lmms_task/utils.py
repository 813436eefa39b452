"""Functions of the local lmms-eval task that tests/apps/test_lmms_eval.py writes (its YAML names them)."""
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    pred = (results[0] or "").strip()
    return {"exact_match": float(pred == doc["answer"]), "answered": float(bool(pred))}
