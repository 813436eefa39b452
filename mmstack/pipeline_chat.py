"""The understanding methods of `mmstack.pipeline.Pipeline` (chat, describe, ground), on its understanding part
and engine. A mixin: it uses the pipeline's attributes (`understanding`, `engine`, limits) and nothing else.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Union

from .engine import Handle
from .errors import CapabilityError, GenerationError


class ChatMixin:
    def _understanding(self, what: str):
        if self.understanding is None:
            raise CapabilityError(f"{self.source or 'this model'} cannot {what}: it has no image-understanding path")
        return self.understanding

    def encode(self, conversations: Sequence[Sequence[dict]], max_new_tokens: int = 0):
        """Conversations -> (inputs_embeds [B,T,D], attention_mask [B,T], the loaded images per sample), as the
        reference decoding loop takes them (the engine embeds inside its own prefill).

        Raises:
            GenerationError: a prompt over `max_prompt_tokens`, or one that leaves no room in the context
                for `max_new_tokens`; checked on the token ids, before anything is embedded.
        """
        import torch

        u = self._understanding("chat about images")
        for c in conversations:
            self.check_prompt_chars(c)
        batch, imgs = u.prepare(conversations, self.prompt_token_limit(), max_images=self.max_images)
        self.check_prompt_length(batch.input_ids.shape[1], max_new_tokens)
        batch = batch.to(self.device)
        with torch.no_grad():
            return self.model.embed(batch), batch.attention_mask, imgs

    def _prepare(self, messages: Sequence[dict], max_new_tokens: int) -> tuple:
        u = self._understanding("chat about images")
        self.check_prompt_chars(messages)
        batch, imgs = u.prepare([messages], self.prompt_token_limit(), max_images=self.max_images)
        self.check_prompt_length(batch.input_ids.shape[1], max_new_tokens)
        self.check_vocab(batch.input_ids.masked_fill(batch.images_seq_mask, 0).flatten())
        return batch, imgs

    def submit_chat(self, messages: Sequence[dict], **sampling) -> Handle:
        """Check and prepare a chat request (limits, images, tokens) and submit it to the engine; returns its
        `Handle` (events with text deltas, `result()` with the text, token ids and finish reason).

        `fit_context=True` caps max_new_tokens to what fits the context after the prompt instead of refusing.
        Raises:
            CapabilityError, GenerationError, ValueError (malformed messages), ImageError, EngineBusy.
        """
        fit = sampling.pop("fit_context", False)
        params = self._params(sampling)
        batch, _ = self._prepare(messages, 0 if fit else params.max_new_tokens)
        room = self.context - batch.input_ids.shape[1]
        if fit and params.max_new_tokens > room:
            if room < 1:
                raise GenerationError(f"the prompt has {batch.input_ids.shape[1]} tokens and fills the model context "
                                      f"({self.context} tokens)")
            params = params.updated(max_new_tokens=room)
        return self._run([self._text_request(params, batch=batch)])[0]

    def chat(self, messages: Sequence[dict], stream: bool = True, **sampling) -> Union[Iterator[str], str]:
        """Answer the last user turn of `messages`. stream=True yields text deltas; False returns the text.

        Messages use the transformers / OpenAI shapes (see `mmstack.vision.messages`); the request is checked
        (limits, images) before this returns, also when streaming. `fit_context=True` caps max_new_tokens to
        what fits the context after the prompt instead of refusing the request."""
        handle = self.submit_chat(messages, **sampling)
        return self._deltas(handle) if stream else handle.result().text

    def chat_batch(self, conversations: Sequence[Sequence[dict]], **sampling) -> list[str]:
        """Answer many conversations at once (they run batched on the engine); returns the texts in order."""
        params = self._params(sampling)
        reqs = [self._text_request(params, batch=self._prepare(c, params.max_new_tokens)[0]) for c in conversations]
        return [h.result().text for h in self._run(reqs)]

    def describe(self, image_or_images, prompt: Optional[str] = None, **sampling) -> str:
        """Describe one image (or several, in one turn). Returns the answer text."""
        u = self._understanding("describe images")
        images = list(image_or_images) if isinstance(image_or_images, (list, tuple)) else [image_or_images]
        if not images:
            raise GenerationError("describe needs at least one image")
        return self.chat(u.describe_messages(images, prompt), stream=False, **sampling)

    def describe_batch(self, images: Sequence, prompts=None, **sampling) -> list[str]:
        """One answer per image (each its own request, batched on the engine). `prompts`: one str for all,
        or one per image (None: describe in detail)."""
        u = self._understanding("describe images")
        images = list(images)
        prompts = [prompts] * len(images) if prompts is None or isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise GenerationError(f"describe_batch got {len(images)} images but {len(prompts)} prompts")
        return self.chat_batch([u.describe_messages([im], p) for im, p in zip(images, prompts)], **sampling)

    def ground(self, image, phrase: str, **sampling):
        """Boxes for `phrase` in original-image pixels (DeepSeek-VL2 `<|ref|>` / `<|det|>` grounding)."""
        u = self._understanding("ground phrases")
        if not u.can_ground:
            raise CapabilityError(f"{self.source}: this model's tokenizer has no grounding tokens (<|ref|>, <|det|>)")
        if not isinstance(phrase, str) or not phrase.strip():
            raise GenerationError("ground needs a non-empty phrase")
        msgs, img = u.grounding_messages(image, phrase)
        sampling.setdefault("max_new_tokens", 128)
        result = self.submit_chat(msgs, **sampling).result()
        return u.boxes(self.tokenizer.decode(result.token_ids, skip_special_tokens=False), img, phrase)
