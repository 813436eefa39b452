"""Tokenizer: a thin wrapper over `tokenizers.Tokenizer` (tokenizer.json) plus tokenizer_config.json.

Special token ids are always read from the files, never hard-coded. BOS is added by this wrapper (per
`add_bos_token`), not by the file's post-processor, so encoding is explicit and the same for every family.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from .errors import TokenizerError  # noqa: F401  (re-exported)

_SURROGATE = re.compile("[\ud800-\udfff]")
# `protect` wraps a span of user text as OPEN + hex(utf-8) + CLOSE (private-use characters); `encode` turns such a
# span into plain-text tokens. So chat templates insert special tokens, and user text never does.
OPEN, CLOSE = "\ue000", "\ue001"
_MARKED = re.compile(OPEN + "([0-9a-f]*)" + CLOSE)


def _token_content(value) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


class Tokenizer:
    def __init__(self, tokenizer, config: Optional[dict] = None, source: str = "<memory>"):
        self.tk = tokenizer
        self.source = source
        cfg = dict(config or {})
        self.add_bos = bool(cfg.get("add_bos_token", True))
        self.add_eos = bool(cfg.get("add_eos_token", False))
        self.bos_token = _token_content(cfg.get("bos_token"))
        self.eos_token = _token_content(cfg.get("eos_token"))
        self.pad_token = _token_content(cfg.get("pad_token"))
        self.bos_id = self._id_or_none(self.bos_token, "bos_token")
        self.eos_id = self._id_or_none(self.eos_token, "eos_token")
        self.pad_id = self._id_or_none(self.pad_token, "pad_token")

    # --------------------------------------------------------------------------- construction
    @classmethod
    def from_dir(cls, path: Union[str, Path]) -> "Tokenizer":
        """Load `path/tokenizer.json` (or `path` itself if it is the json) with its tokenizer_config.json."""
        from tokenizers import Tokenizer as _Tk

        from .io.files import UnsafeFileError, read_text

        p = Path(path)
        file = p if p.is_file() or (p.exists() and not p.is_dir()) else p / "tokenizer.json"
        if not file.exists():
            raise TokenizerError(f"{p}: no tokenizer.json found")
        try:  # a bounded regular file: a FIFO or /dev/zero behind the name is refused before reading
            tk = _Tk.from_str(read_text(file, what="tokenizer.json"))
        except UnsafeFileError as e:
            raise TokenizerError(str(e)) from None
        except Exception as e:
            raise TokenizerError(f"{file}: cannot read tokenizer ({type(e).__name__}: {str(e)[:200]})") from None
        cfg: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            f = file.parent / name
            if f.exists():
                try:
                    data = json.loads(read_text(f, what=name))
                except UnsafeFileError as e:
                    raise TokenizerError(str(e)) from None
                except (ValueError, RecursionError) as e:
                    raise TokenizerError(f"{f}: invalid JSON ({type(e).__name__}: {e})") from None
                if not isinstance(data, dict):
                    raise TokenizerError(f"{f}: expected a JSON object, got {type(data).__name__}")
                cfg.update(data)
        return cls(tk, cfg, source=str(file))

    def _id_or_none(self, token: Optional[str], what: str) -> Optional[int]:
        if token is None:
            return None
        if not isinstance(token, str):
            raise TokenizerError(f"{self.source}: {what} must be a string, got {token!r:.60}")
        tid = self.tk.token_to_id(token)
        if tid is None:
            raise TokenizerError(f"{self.source}: {what} {token!r} is not in the vocabulary")
        return tid

    # --------------------------------------------------------------------------- queries
    @property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (the longest vocabulary entry): a text of N characters
        has at least N / max_token_chars tokens, which bounds a prompt before it is tokenized."""
        if getattr(self, "_max_token_chars", None) is None:
            self._max_token_chars = max((len(t) for t in self.tk.get_vocab(with_added_tokens=True)), default=1)
        return self._max_token_chars

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str, required: bool = True) -> Optional[int]:
        """The id of `token`; None when it is missing and not `required`.

        Raises:
            TokenizerError: `token` is missing from the vocabulary (and `required`), or is not a str.
        """
        if not isinstance(token, str):
            raise TokenizerError(f"{self.source}: special token must be a string, got {token!r:.60}")
        tid = self.tk.token_to_id(token)
        if tid is None and required:
            raise TokenizerError(f"{self.source}: special token {token!r} is missing from the vocabulary")
        return tid

    @property
    def special_ids(self) -> set[int]:
        return {t.id if hasattr(t, "id") else k for k, t in self.tk.get_added_tokens_decoder().items() if t.special}

    # --------------------------------------------------------------------------- user text
    def protect(self, text: str, allow: Sequence[str] = ()) -> str:
        """Mark every added-token string in user text (`<|User|>`, the end of sentence, `<image>` ...) so that
        `encode` tokenizes it as plain text: a message cannot forge a turn, an end or an image slot.

        `allow` names markup tokens that are part of the documented prompt language and stay special when
        typed (DeepSeek-VL2's grounding tags `<|ref|>` ... `<|/ref|>`); control tokens are never in it."""
        if not isinstance(text, str):
            return text
        keep = frozenset(allow) - self._control_tokens()
        return self._specials_re().sub(
            lambda m: m.group(0) if m.group(0) in keep else OPEN + m.group(0).encode("utf-8").hex() + CLOSE, text)

    def _control_tokens(self) -> frozenset:
        return frozenset(t for t in (self.bos_token, self.eos_token, self.pad_token) if t)

    def _specials_re(self) -> "re.Pattern":
        if getattr(self, "_specials", None) is None:
            words = sorted({t.content for t in self.tk.get_added_tokens_decoder().values() if t.content}, key=len,
                           reverse=True)
            self._specials = re.compile("|".join([re.escape(w) for w in words] + [f"[{OPEN}{CLOSE}]"]))
        return self._specials

    def _plain(self):
        """A copy of the tokenizer that reads added-token strings as ordinary text."""
        if getattr(self, "_plain_tk", None) is None:
            from tokenizers import Tokenizer as _Tk

            tk = _Tk.from_str(self.tk.to_str())
            tk.encode_special_tokens = True
            self._plain_tk = tk
        return self._plain_tk

    # --------------------------------------------------------------------------- encode / decode
    def _raw(self, tk, text: str) -> list[int]:
        try:
            return tk.encode(text, add_special_tokens=False).ids
        except TypeError:  # tokenizers refuses strings that are not valid UTF-8 (lone surrogates)
            return tk.encode(_SURROGATE.sub("\ufffd", text), add_special_tokens=False).ids

    def encode(self, text: str, bos: Optional[bool] = None, eos: bool = False) -> list[int]:
        """Token ids of `text` (BOS per `add_bos_token` unless `bos` says otherwise, EOS when asked). Spans
        marked by `protect` (user text inside a template) are tokenized as plain text.

        Lone surrogates (JSON allows `"\\ud800"`, which is not valid Unicode text) become U+FFFD.

        Raises:
            TokenizerError: `text` is not a str.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"can only encode text (str), got {type(text).__name__}")
        if OPEN not in text:
            ids = self._raw(self.tk, text)
        else:
            ids, pieces = [], _MARKED.split(text)  # text, hex, text, hex, ..., text
            for k, piece in enumerate(pieces):
                if k % 2 == 0:
                    ids += self._raw(self.tk, piece) if piece else []
                else:
                    ids += self._raw(self._plain(), bytes.fromhex(piece).decode("utf-8", "replace"))
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_answer(self, ids: Iterable[int]) -> str:
        """Text of generated ids keeping markup tokens (grounding `<|ref|>`/`<|det|>` tags) but not the
        control tokens (BOS, EOS, pad)."""
        control = {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}
        return self.tk.decode([i for i in ids if i not in control], skip_special_tokens=False)

    def batch_pad(self, seqs: Sequence[Sequence[int]], pad_id: Optional[int] = None, side: str = "left"):
        """Left-pad id lists -> (input_ids [B,T] long, attention_mask [B,T] long)."""
        import torch

        pad = pad_id if pad_id is not None else (self.pad_id if self.pad_id is not None else (self.eos_id or 0))
        t = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), t), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), t), dtype=torch.long)
        for i, s in enumerate(seqs):
            if side == "left":
                ids[i, t - len(s) :] = torch.tensor(s, dtype=torch.long)
                mask[i, t - len(s) :] = 1
            else:
                ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
                mask[i, : len(s)] = 1
        return ids, mask
