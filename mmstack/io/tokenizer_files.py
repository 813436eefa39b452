"""The tokenizer files that travel with a model folder (copied on save, convert and export)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Union

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "chat_template.jinja")


def copy_tokenizer(src: Union[str, Path], out: Path, names: tuple = TOKENIZER_FILES) -> None:
    """Copy the tokenizer files of folder `src` (or of the folder holding `src`, a tokenizer.json) to `out`."""
    src = Path(src)
    src = src.parent if src.is_file() else src
    for name in names:
        if (src / name).exists() and (src / name).resolve() != (Path(out) / name).resolve():
            shutil.copyfile(src / name, Path(out) / name)
