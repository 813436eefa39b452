"""What a model folder says about how to use it, read as data: `demo.json` holds example prompts, the chat
sampling the model was evaluated with, and the prompts of the batch jobs (`tasks`). A model trained on a narrow
domain (like the embedded one) needs its own prompts; the official checkpoints have no such file and keep the
official defaults. A bad file or field is ignored with a warning. No gradio here: the server and the batch
jobs read these too.

    {"generate_examples": ["a red circle", ...],
     "chat_sampling": {"temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0, "max_new_tokens": 128},
     "tasks": {"ocr": {"prompt": "Read the text in the image.", "max_new_tokens": 64}, "chart": {...}},
     "examples": {"chat": [{"text": "Describe this image.", "image": "examples/scene.png"}],
                  "documents": ["examples/chart.png"]},
     "about": {"trained_on": "...", "real_model": "org/name"}}     # read by `model_card`

Example images are paths inside the model folder (small PNG / JPEG files); any other path is ignored.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Union

log = logging.getLogger(__name__)

# Defaults of the official demos (VL2 web_demo.py; Janus app_januspro.py / app_janusflow.py).
CHAT_DEFAULTS = dict(temperature=0.1, top_p=0.9, max_new_tokens=512, repetition_penalty=1.1)
CHAT_LIMITS = dict(temperature=(0.0, 1.5), top_p=(0.05, 1.0), max_new_tokens=(1, 1 << 20), repetition_penalty=(1.0, 2.0))
CFG_DEFAULTS = {"vq": 5.0, "flow": 2.0}
SETTINGS_FILE = "demo.json"
EXAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_EXAMPLE_BYTES = 1 << 20


def _in_limits(key: str, value) -> bool:
    if key not in CHAT_LIMITS or isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    lo, hi = CHAT_LIMITS[key]
    return lo <= value <= hi


def demo_settings(pipe) -> dict:
    """The model folder's `demo.json`, validated: a model trained on a narrow domain (like the embedded one)
    ships prompts it knows and the sampling it was evaluated with. The file is data: a bad file or field is
    ignored with a warning, and the defaults apply."""
    path = Path(pipe.source) / SETTINGS_FILE if pipe.source and Path(pipe.source).is_dir() else None
    if path is None or not path.is_file():
        return {}
    try:
        from mmstack.io.files import read_text

        raw = json.loads(read_text(path, what=SETTINGS_FILE))
        if not isinstance(raw, dict):
            raise ValueError("expected a JSON object")
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        log.warning("%s: ignored (%s)", path, type(e).__name__ if isinstance(e, RecursionError) else e)
        return {}
    out = {}
    prompts = raw.get("generate_examples")
    if prompts is not None:
        if isinstance(prompts, list) and prompts and all(isinstance(x, str) and 0 < len(x) <= 500 for x in prompts):
            out["generate_examples"] = prompts[:12]
        else:
            log.warning("%s: generate_examples ignored (a non-empty list of strings of 1..500 characters)", path)
    sampling = raw.get("chat_sampling")
    if sampling is not None:
        if isinstance(sampling, dict) and all(_in_limits(k, v) for k, v in sampling.items()):
            out["chat_sampling"] = {**CHAT_DEFAULTS, **sampling}
        else:
            log.warning("%s: chat_sampling ignored (keys %s within %s)", path, sorted(CHAT_DEFAULTS), CHAT_LIMITS)
    examples = raw.get("examples")
    if examples is not None:
        out.update(_examples(examples, path.parent, path))
    return out


def _example_file(folder: Path, name) -> Optional[str]:
    """The absolute path of example `name` if it is a small image file inside `folder`, else None."""
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        return None
    try:  # a NUL byte, a name too long for the file system, a symlink loop: not an example
        target = (folder / name).resolve()
        root = folder.resolve()
        if root not in target.parents or target.suffix.lower() not in EXAMPLE_SUFFIXES or not target.is_file():
            return None
        return str(target) if target.stat().st_size <= MAX_EXAMPLE_BYTES else None
    except (OSError, ValueError, RuntimeError):
        return None


def _examples(raw, folder: Path, where: Path) -> dict:
    """`chat_examples` [(text, image path)] and `document_examples` [image path] from demo.json's "examples";
    each entry that is not a small image inside the model folder is ignored with a warning."""
    out: dict = {}
    if not isinstance(raw, dict):
        log.warning("%s: examples ignored (an object with chat and documents lists)", where)
        return out
    chat = []
    for item in raw.get("chat") or []:
        image = _example_file(folder, item.get("image")) if isinstance(item, dict) else None
        text = item.get("text") if isinstance(item, dict) else None
        if image and isinstance(text, str) and 0 < len(text) <= 500:
            chat.append((text, image))
        else:
            log.warning("%s: chat example %.80r ignored (text and an image inside the model folder)", where, item)
    docs = []
    for name in raw.get("documents") or []:
        image = _example_file(folder, name)
        if image:
            docs.append(image)
        else:
            log.warning("%s: document example %.80r ignored (an image inside the model folder)", where, name)
    if chat:
        out["chat_examples"] = chat[:8]
    if docs:
        out["document_examples"] = docs[:8]
    return out


def cfg_default(pipe, mode: str) -> float:
    """The CFG weight the model's config recommends for `mode` (vq_head / flow_head), else the family default."""
    head = pipe.model.cfg.parts.get("vq_head" if mode == "vq" else "flow_head")
    weight = getattr(head, "cfg_weight", None)
    return float(weight) if weight else CFG_DEFAULTS[mode]


def task_defaults(model_dir: Optional[Union[str, Path]], name: str) -> dict:
    """The model folder's own settings for a job: `demo.json` -> `"tasks": {name: {"prompt", "max_new_tokens"}}`
    ({} when absent; a malformed entry is ignored with a warning)."""
    if model_dir is None or not (Path(model_dir) / SETTINGS_FILE).is_file():
        return {}
    from mmstack.io.files import read_text

    try:
        task = json.loads(read_text(Path(model_dir) / SETTINGS_FILE)).get("tasks", {}).get(name, {})
    except (ValueError, OSError, AttributeError, RecursionError) as e:
        log.warning("%s/demo.json: ignored (%s)", model_dir, type(e).__name__ if isinstance(e, RecursionError) else e)
        return {}
    out = {}
    if isinstance(task, dict) and isinstance(task.get("prompt"), str) and task["prompt"].strip():
        out["prompt"] = task["prompt"]
    if isinstance(task, dict) and isinstance(task.get("max_new_tokens"), int) and task["max_new_tokens"] > 0:
        out["max_new_tokens"] = task["max_new_tokens"]
    return out
