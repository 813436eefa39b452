"""Model names: a local folder, or a Hugging Face hub id (`org/name`, `org/name@revision`) resolved to a
snapshot folder of the local cache through `huggingface_hub.snapshot_download` (cache dir from `HF_HOME` /
`HF_HUB_CACHE`, `HF_HUB_OFFLINE`, token from `HF_TOKEN`). Only weights, configs and tokenizer files are
fetched, never code (`*.py`): nothing in a model folder is executed anyway.

    resolve_model("deepseek-ai/deepseek-vl2-tiny")          # -> .../models--deepseek-ai--deepseek-vl2-tiny/snapshots/<sha>
    resolve_model("deepseek-ai/Janus-Pro-1B@main")
    resolve_model("path/to/folder")                          # a folder is returned as it is
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Optional, Union

log = logging.getLogger(__name__)

# what a model folder needs: weights, configs, tokenizer files (and the VAE of JanusFlow under vae/)
ALLOW_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.model", "*.txt", "*.jinja",
                  "vae/*.safetensors", "vae/*.json"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}(@[A-Za-z0-9._/-]{1,255})?$")


class ModelNotFoundError(FileNotFoundError):
    """Neither a folder nor a hub id that could be resolved; the message says how to get it."""


def is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and ".." not in name


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model(name: Union[str, os.PathLike], what: str = "model") -> Path:
    """A local folder as it is; a hub id -> its snapshot folder in the Hugging Face cache (downloaded unless
    offline).

    Raises:
        ModelNotFoundError: no such folder and not a hub id, or a hub id that cannot be resolved (offline and
            not cached, unknown repository or revision, no network); one line saying what to do.
    """
    p = Path(name)
    if p.exists():
        return p
    text = str(name)
    if not is_hub_id(text):
        raise ModelNotFoundError(f"{text}: no such {what} folder (nor a hub id of the form org/name[@revision])")
    repo, _, revision = text.partition("@")
    return _snapshot(repo, revision or None, what)


def _snapshot(repo: str, revision: Optional[str], what: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError:  # pragma: no cover - a dependency of transformers
        raise ModelNotFoundError(f"{repo}: resolving hub ids needs huggingface_hub (pip install huggingface_hub)") from None
    ref = f"{repo}@{revision}" if revision else repo
    try:
        folder = snapshot_download(repo, revision=revision, allow_patterns=ALLOW_PATTERNS, local_files_only=offline(),
                                   cache_dir=_cache_dir())
    except LocalEntryNotFoundError:
        how = (f"download it first with `hf download {repo}" + (f" --revision {revision}" if revision else "") + "`"
               " (or unset HF_HUB_OFFLINE)") if offline() else "check the network or the HF_HUB_CACHE folder"
        raise ModelNotFoundError(f"{ref}: not in the Hugging Face cache ({_cache_dir()}): {how}") from None
    except GatedRepoError:
        raise ModelNotFoundError(f"{ref}: a gated repository: accept its terms on the hub and set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"{ref}: the repository has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{repo}: no such {what} on the hub (or it is private: set HF_TOKEN)") from None
    except OSError as e:  # network errors and the like
        raise ModelNotFoundError(f"{ref}: could not be downloaded ({type(e).__name__}: {str(e)[:200]})") from None
    path = Path(folder)
    if not (path / "config.json").exists():
        raise ModelNotFoundError(f"{ref}: the snapshot {path} has no config.json (an incomplete download?)")
    log.info("%s -> %s", ref, path)
    return path


def _cache_dir() -> str:
    """The hub cache as the environment names it now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")
