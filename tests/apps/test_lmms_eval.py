"""lmms-eval (the `[eval]` extra) as a real harness: its `openai` model pointed at `mmstack serve`, on a tiny local
task over in-domain synthetic images (no downloads). Skipped unless lmms-eval is installed."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

from test_serve import HUB_ID, Server  # noqa: E402

TASK = """task: "mmstack_ocr_local"
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: "answer"
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: 24
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
  - metric: answered
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""


@pytest.mark.eval
def test_lmms_eval_scores_the_server_on_a_local_task(tmp_path):
    from mmstack.apps import synth

    synth.generate(tmp_path / "synth", 8, seed=21, kinds=("ocr",), image_size=64, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "synth" / "data.jsonl").read_text().splitlines()]
    data = tmp_path / "ocr.jsonl"
    data.write_text("".join(json.dumps({"image": str(tmp_path / "synth" / r["images"][0]),
                                        "question": "Read the text in the image.",
                                        "answer": r["messages"][1]["content"]}) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    shutil.copy(Path(__file__).with_name("lmms_task") / "utils.py", tasks / "utils.py")
    (tasks / "mmstack_ocr_local.yaml").write_text(TASK.format(data=data))
    server = Server(tmp_path)
    try:
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": "unused",
               "HF_DATASETS_CACHE": str(tmp_path / "ds-cache")}
        r = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "openai", "--model_args",
                            f"model_version={HUB_ID},base_url={server.url}/v1", "--tasks", "mmstack_ocr_local",
                            "--include_path", str(tasks), "--output_path", str(tmp_path / "out"), "--batch_size", "4"],
                           env=env, capture_output=True, text=True, timeout=600)
    finally:
        server.close()
    assert r.returncode == 0, r.stderr[-3000:]
    found = list((tmp_path / "out").rglob("*results*.json"))
    assert found, r.stdout[-2000:]
    result = json.loads(found[0].read_text())["results"]["mmstack_ocr_local"]
    assert result["answered,none"] == 1.0  # every image answered through the server
    assert 0.0 <= result["exact_match,none"] <= 1.0
