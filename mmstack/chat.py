"""Chat formats: the conversation templates of DeepSeek-VL2, Janus / Janus-Pro and JanusFlow.

All families use DeepSeek's "deepseek" template: `{role}: {content}` turns separated by "\n\n" after a
user turn and by the EOS string after an assistant turn, ending with `{assistant_role}:` for generation.
Role strings differ: Janus-Pro and VL2 use "<|User|>"/"<|Assistant|>", Janus-1.3B and JanusFlow
"User"/"Assistant". Special token ids always come from the tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import ConfigError

JANUS_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)

# Named chat formats users can pick in `mmstack.load(..., chat_format=...)`.
CHAT_FORMATS = {
    "deepseek-vl2": dict(user_role="<|User|>", assistant_role="<|Assistant|>"),
    "janus-pro": dict(user_role="<|User|>", assistant_role="<|Assistant|>",
                      system_prompt=JANUS_SYSTEM_PROMPT),
    "janus-1.3b": dict(user_role="User", assistant_role="Assistant", system_prompt=JANUS_SYSTEM_PROMPT),
    "janusflow": dict(user_role="User", assistant_role="Assistant",
                      system_prompt=JANUS_SYSTEM_PROMPT),
}


@dataclass
class ChatConfig:
    """The "deepseek" conversation template with a family's role strings, plus the tag strings of its image
    and generation spans. Special token ids always come from the tokenizer."""

    user_role: str = "<|User|>"
    assistant_role: str = "<|Assistant|>"
    system_prompt: str = ""
    sep: str = "\n\n"
    eos_text: str = "<｜end▁of▁sentence｜>"
    image_tag: str = "<image>"
    image_start_tag: Optional[str] = None
    image_end_tag: Optional[str] = None
    pad_tag: str = "<｜▁pad▁｜>"
    num_image_tokens: int = 0  # Janus: image tokens per image (576 at 384/16)
    gen_tag: Optional[str] = None  # token that starts image generation

    def validate(self) -> None:
        for name in ("user_role", "assistant_role", "system_prompt", "sep", "eos_text", "image_tag", "pad_tag"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"chat.{name} must be a string, got {getattr(self, name)!r:.60}")
        if isinstance(self.num_image_tokens, bool) or not isinstance(self.num_image_tokens, int) \
                or not 0 <= self.num_image_tokens <= 1 << 16:
            raise ConfigError(f"chat.num_image_tokens must be an integer 0..65536, got {self.num_image_tokens!r}")

    def with_format(self, name: str) -> "ChatConfig":
        if name not in CHAT_FORMATS:
            raise ConfigError(f"unknown chat format {name!r} (known: {sorted(CHAT_FORMATS)})")
        from dataclasses import replace

        return replace(self, **CHAT_FORMATS[name])

    def prompt(self, messages: list[dict], system_prompt: Optional[str] = None) -> str:
        """The "deepseek" template over text messages [{"role": "user"|"assistant", "content": str}].

        Ends with `{assistant_role}:` when the last message is a user turn (a generation prompt).

        Raises:
            ValueError: `messages` not a list of dicts with a str `role` and a str `content`, or a system
                prompt that is not a str.
        """
        system = self.system_prompt if system_prompt is None else system_prompt
        if not isinstance(system, str):
            raise ValueError(f"system_prompt must be a str, got {type(system).__name__}")
        if not isinstance(messages, (list, tuple)):
            raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
                raise ValueError(f"message {i} must be a dict with a str 'role' and a str 'content', got {m!r:.80}")
        out = system + self.sep if system else ""
        turns = list(messages)
        if turns and turns[-1]["role"] in ("user", self.user_role):
            turns.append({"role": "assistant", "content": ""})
        for i, m in enumerate(turns):
            role = self.user_role if m["role"] in ("user", self.user_role) else self.assistant_role
            content = m["content"].strip()
            if content:
                out += f"{role}: {content}" + (self.sep if role == self.user_role else self.eos_text)
            else:
                out += f"{role}:"
        return out

