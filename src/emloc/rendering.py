"""Render demonstrations and queries with the tokenizer's chat template into token ids.

Answer spans are found by rendering, never by hard-coded token ids: the span of a demo is the
token that opens the answer (the last token of the assistant header, e.g. its newline), the
answer tokens, and the end-of-turn token that follows the answer text.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import EMLoCError

_SYSTEM_SENTINEL = "\u2063emloc-system\u2063"


@dataclass
class RenderedSequence:
    """Token ids of one rendered conversation and the answer span of each demo in it.

    ids    list[int]                 the tokens, as the model sees them
    spans  list[tuple[int, int]]     [start, end) token index of each demo's answer span
    """

    ids: list
    spans: list

    @property
    def answer_mask(self) -> list:
        mask = [False] * len(self.ids)
        for start, end in self.spans:
            for i in range(start, end):
                mask[i] = True
        return mask


def demo_text(content, where: str) -> str:
    """The text of a demo's input or a query: a string, or text-only chat content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        texts = []
        for part in content:
            if not isinstance(part, dict) or "type" not in part:
                raise EMLoCError(f"{where}: content parts must be dicts with a 'type', got {part!r}")
            if part["type"] != "text":
                raise EMLoCError(f"{where}: a part of type {part['type']!r} needs a vision-language "
                                 "model; this model takes text only")
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise EMLoCError(f"{where}: expected a string or a list of content parts, got {type(content).__name__}")


class ChatRenderer:
    """Turns demos and queries into token ids with the tokenizer's own chat template."""

    def __init__(self, tokenizer):
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps one
        if not getattr(self.tokenizer, "chat_template", None):
            raise EMLoCError(
                "the tokenizer has no chat template; emloc renders demonstrations with it. Set "
                "tokenizer.chat_template to a Jinja template (for example the one of the instruct "
                "model of the same family) and try again")
        if not getattr(self.tokenizer, "is_fast", True):
            raise EMLoCError("emloc needs a fast (Rust) tokenizer to locate answer spans by offsets")
        self._system_head = None

    # -- template calls -------------------------------------------------------------------
    def _template(self, messages, generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja raises its own errors for templates that reject input
            raise EMLoCError(f"the chat template could not render the conversation: {exc}") from exc

    def _render(self, messages, system, generation_prompt: bool) -> str:
        """Render with `system`: a string, None (the template's default) or False (no system)."""
        if system is None:
            return self._template(messages, generation_prompt)
        if system is not False:
            return self._template([{"role": "system", "content": system}] + messages, generation_prompt)
        head = self._system_only_head()
        full = self._template([{"role": "system", "content": _SYSTEM_SENTINEL}] + messages,
                              generation_prompt)
        if not full.startswith(head):
            raise EMLoCError("the chat template renders a system message in a way emloc cannot "
                             "separate from the turns that follow it")
        return full[len(head):]

    def _system_only_head(self) -> str:
        if self._system_head is None:
            head = self._template([{"role": "system", "content": _SYSTEM_SENTINEL}], False)
            if _SYSTEM_SENTINEL not in head:
                raise EMLoCError("the chat template does not render system messages; emloc needs "
                                 "it to separate chunks from the conversation's opening")
            self._system_head = head
        return self._system_head

    def _tokenize(self, text: str):
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    # -- public ---------------------------------------------------------------------------
    def demos(self, demos, system=False) -> RenderedSequence:
        """One chat sequence of user/assistant turns (no generation prompt).

        system: a string, None (the template's default system message) or False (none).
        """
        messages = []
        for i, demo in enumerate(demos):
            messages.append({"role": "user", "content": demo_text(demo["input"], f"demo {i} input")})
            messages.append({"role": "assistant", "content": demo["output"]})
        text = self._render(messages, system, False)
        ids, offsets = self._tokenize(text)
        spans, cursor = [], 0
        for k in range(len(demos)):
            prefix = self._render(messages[:2 * k + 1], system, True)
            answer = messages[2 * k + 1]["content"]
            search_from = len(prefix) if text.startswith(prefix) else cursor
            start = text.find(answer, search_from)
            if start < 0 and answer.strip():
                start = text.find(answer.strip(), cursor)
                answer = answer.strip()
            if start < 0:
                raise EMLoCError(f"could not find the answer of demo {k} in the rendered chat")
            spans.append(self._span(offsets, start, start + len(answer), k))
            cursor = start + len(answer)
        return RenderedSequence(ids, spans)

    @staticmethod
    def _span(offsets, a_start: int, a_end: int, k: int) -> tuple:
        opener = max((i for i, (s, _) in enumerate(offsets) if s < a_start), default=None)
        closer = next((i for i, (s, e) in enumerate(offsets) if s >= a_end and e > s), None)
        if opener is None or closer is None:
            raise EMLoCError(f"demo {k}: the chat template puts no token before or after the answer")
        return opener, closer + 1

    def query(self, content) -> RenderedSequence:
        """A query (no answer spans): no system message, with the generation prompt."""
        text = self._render([{"role": "user", "content": demo_text(content, "query")}], False, True)
        return RenderedSequence(self._tokenize(text)[0], [])

    def text_ids(self, text: str) -> list:
        """Plain token ids of a continuation string (no template, no special tokens)."""
        return self._tokenize(text)[0]
