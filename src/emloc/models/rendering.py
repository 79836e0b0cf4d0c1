"""Render demonstrations and queries with the tokenizer's chat template into token ids.

Answer spans are found by rendering, never by hard-coded token ids: the span of a demo is the
token that opens the answer (the last token of the assistant header, e.g. its newline), the
answer tokens, and the end-of-turn token that follows the answer text.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from emloc.errors import EMLoCError
from emloc.models.media import KINDS

_SYSTEM_SENTINEL = "\u2063emloc-system\u2063"


@dataclass
class RenderedSequence:
    """Token ids of one rendered conversation and the answer span of each demo in it.

    ids    list[int]                 the tokens, as the model sees them
    spans  list[tuple[int, int]]     [start, end) token index of each demo's answer span
    media  list[MediaItem]           images/videos in the order of their placeholder runs
    """

    ids: list
    spans: list
    media: list = field(default_factory=list)

    @property
    def answer_mask(self) -> list:
        mask = [False] * len(self.ids)
        for start, end in self.spans:
            for i in range(start, end):
                mask[i] = True
        return mask


def check_text(text, where: str) -> None:
    """Raise EMLoCError unless `text` is a string of valid Unicode (no lone surrogates, which
    cannot be encoded as UTF-8 and so cannot be tokenized)."""
    if not isinstance(text, str):
        raise EMLoCError(f"{where}: text must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EMLoCError(f"{where}: the text is not valid Unicode (a lone surrogate {text[exc.start]!r} at "
                         f"character {exc.start}); fix the encoding of the data") from None


def check_content(content, where: str) -> None:
    """Raise EMLoCError for a demo input or query that no model can take, checked without a
    tokenizer: a string, or a non-empty list of parts {"type": "text", "text": str} /
    {"type": "image" | "video", ...}; valid Unicode; not empty (some non-blank text, or an
    image/video)."""
    if isinstance(content, str):
        check_text(content, where)
        if not content.strip():
            raise EMLoCError(f"{where} is empty or blank: give some text")
        return
    if not isinstance(content, (list, tuple)):
        raise EMLoCError(f"{where}: expected a string or a list of content parts, got {type(content).__name__}")
    if not content:
        raise EMLoCError(f"{where} is an empty list of content parts: give text or an image/video part")
    has_media = False
    for part in content:
        if not isinstance(part, dict) or "type" not in part:
            raise EMLoCError(f"{where}: content parts must be dicts with a 'type', got {part!r}")
        if part["type"] == "text":
            if "text" not in part:
                raise EMLoCError(f"{where}: a text part has no 'text' entry; give {{'type': 'text', 'text': ...}}")
            check_text(part["text"], f"{where}, text part")
        elif part["type"] in KINDS:
            has_media = True
        else:
            raise EMLoCError(f"{where}: unknown content part type {part['type']!r}; use 'text', 'image' or 'video'")
    if not has_media and not any(p["text"].strip() for p in content):
        raise EMLoCError(f"{where} has only blank text parts: give some text or an image/video")


def message_content(content, where: str, media=None, prepare: bool = True, special=None):
    """A demo's input or a query -> (content for the chat template, [MediaItem]).

    content: a string, or chat content parts ({"type": "text", "text": ...}, and with a
    MediaPreparer `media` also {"type": "image", "image": ...} / {"type": "video", "video": [...]}),
    as check_content requires. Text-only parts are joined into one string; parts with media stay
    parts, each image or video replaced by its bare {"type": kind} placeholder part.
    prepare=False only checks the parts (no image is processed; the returned items are None).
    special(text, where) checks each text for the tokenizer's control tokens.
    """
    check_content(content, where)
    if isinstance(content, str):
        _check_no_placeholder(content, where, media)
        if special is not None:
            special(content, where)
        return content, []
    parts, items = [], []
    for part in content:
        kind = part["type"]
        if kind == "text":
            parts.append({"type": "text", "text": part["text"]})
            _check_no_placeholder(part["text"], where, media)
            if special is not None:
                special(part["text"], where)
        elif media is not None:
            if prepare:
                items.append(media.prepare(part, where))
            else:
                media.check(part, where, load=False)
                items.append(None)
            parts.append({"type": kind})
        else:
            raise EMLoCError(f"{where}: a part of type {kind!r} needs a vision-language model (Qwen2-VL, "
                             "Qwen2.5-VL) given with its processor (AutoProcessor), not only its tokenizer; "
                             "with the model and tokenizer given, emloc takes text only")
    if not items:
        return "".join(p["text"] for p in parts), []
    return parts, items


def _check_no_placeholder(text: str, where: str, media) -> None:
    """Raise EMLoCError if `text` holds an image/video placeholder token of a model that takes
    media (it would be read as an image/video without one to go with it)."""
    if media is None:
        return
    for kind, token in media.tokens.items():
        if token in text:
            raise EMLoCError(f"{where}: the text contains the {kind} placeholder token {token!r}; give each "
                             f"{kind} as a content part {{'type': {kind!r}, {kind!r}: ...}} and leave the "
                             "placeholder out of the text (the chat template inserts it)")


class ChatRenderer:
    """Turns demos and queries into token ids with the tokenizer's own chat template.

    processor  a tokenizer, or a processor that wraps one (its chat template is preferred)
    media      a MediaPreparer for models that take images/videos, else None (text only)
    """

    def __init__(self, processor, media=None):
        self.tokenizer = getattr(processor, "tokenizer", processor)  # a processor wraps one
        self.media = media
        self.chat_template = getattr(processor, "chat_template", None) or getattr(
            self.tokenizer, "chat_template", None)
        if media is not None:
            placeholders = "|".join(re.escape(t) for t in media.tokens.values())
            self._placeholder = re.compile(f"({placeholders})")
        if not self.chat_template:
            raise EMLoCError(
                "the tokenizer has no chat template; emloc renders demonstrations with it. Set "
                "tokenizer.chat_template to a Jinja template (for example the one of the instruct "
                "model of the same family) and try again")
        if not getattr(self.tokenizer, "is_fast", True):
            raise EMLoCError("emloc needs a fast (Rust) tokenizer to locate answer spans by offsets")
        self._system_head = None
        added = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        self._control_ids = {i for i, token in added.items() if getattr(token, "special", False)}
        self._control_ids |= set(getattr(self.tokenizer, "all_special_ids", []) or [])

    def check_user_text(self, text: str, where: str) -> None:
        """Raise EMLoCError if user text (a demo's input or output, a system message, a query)
        holds one of the tokenizer's control tokens (e.g. "<|im_end|>"): rendered, it would become
        a real turn marker, so demo data could inject fake turns. Such text is refused, never
        silently changed."""
        check_text(text, where)
        if not self._control_ids:
            return
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        found = [i for i in ids if i in self._control_ids]
        if found:
            token = self.tokenizer.convert_ids_to_tokens(found[0])
            raise EMLoCError(f"{where}: the text contains {token!r}, a control token of this tokenizer; "
                             "it would be read as chat structure, not as text. Remove it or break it up "
                             f"(e.g. {token[:1] + ' ' + token[1:]!r})")

    # -- template calls -------------------------------------------------------------------
    def _template(self, messages, generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt,
                chat_template=self.chat_template)
        except Exception as exc:  # jinja raises its own errors for templates that reject input
            raise EMLoCError(f"the chat template could not render the conversation: {exc}") from exc

    def _render(self, messages, system, generation_prompt: bool) -> str:
        """Render with `system`: a string, None (the template's default) or False (no system)."""
        if system is None:
            return self._template(messages, generation_prompt)
        if system is not False:
            self.check_user_text(system, "system")
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

    def _expand(self, text: str, items: list, where: str, whole: bool = True) -> str:
        """Repeat the k-th media placeholder of `text` items[k].n_tokens times. whole=True: the
        text must hold exactly one placeholder per item, of the item's kind."""
        if not items:
            if self.media is not None and self._placeholder.search(text):
                raise EMLoCError(f"{where}: the text contains an image/video placeholder token but "
                                 "no image or video part goes with it")
            return text
        pieces, cursor, k = [], 0, 0
        for match in self._placeholder.finditer(text):
            if k == len(items) or match.group(0) != self.media.tokens[items[k].kind]:
                k = -1
                break
            pieces += [text[cursor:match.start()], match.group(0) * items[k].n_tokens]
            cursor, k = match.end(), k + 1
        if k < 0 or (whole and k != len(items)):
            raise EMLoCError(f"{where}: the rendered chat's image/video placeholders do not match the "
                             f"{len(items)} image/video parts given (does a text part contain a "
                             "placeholder token, or does the chat template drop a part?)")
        return "".join(pieces) + text[cursor:]

    # -- public ---------------------------------------------------------------------------
    def demos(self, demos, system=False) -> RenderedSequence:
        """One chat sequence of user/assistant turns (no generation prompt).

        system: a string, None (the template's default system message) or False (none).
        """
        messages, media = [], []
        for i, demo in enumerate(demos):
            content, items = message_content(demo["input"], f"demo {i} input", self.media,
                                             special=self.check_user_text)
            self.check_user_text(demo["output"], f"demo {i} output")
            messages.append({"role": "user", "content": content})
            messages.append({"role": "assistant", "content": demo["output"]})
            media += items
        text = self._expand(self._render(messages, system, False), media, "demos")
        ids, offsets = self._tokenize(text)
        spans, cursor = [], 0
        for k in range(len(demos)):
            prefix = self._expand(self._render(messages[:2 * k + 1], system, True), media, "demos",
                                  whole=False)
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
        return RenderedSequence(ids, spans, media)

    @staticmethod
    def _span(offsets, a_start: int, a_end: int, k: int) -> tuple:
        opener = max((i for i, (s, _) in enumerate(offsets) if s < a_start), default=None)
        closer = next((i for i, (s, e) in enumerate(offsets) if s >= a_end and e > s), None)
        if opener is None or closer is None:
            raise EMLoCError(f"demo {k}: the chat template puts no token before or after the answer")
        return opener, closer + 1

    def query(self, content) -> RenderedSequence:
        """A query (no answer spans): no system message, with the generation prompt."""
        content, media = message_content(content, "query", self.media, special=self.check_user_text)
        text = self._expand(self._render([{"role": "user", "content": content}], False, True), media, "query")
        return RenderedSequence(self._tokenize(text)[0], [], media)

    def prepared(self, demo: dict, where: str) -> dict:
        """The demo with its image/video parts replaced by MediaItems (processed once, so that
        every rendering of the demo shares them); its input is checked here, so that errors name
        the demo as `where` does (demos() only knows its position within a chunk)."""
        if self.media is not None and isinstance(demo["input"], (list, tuple)):
            parts = [{"type": p["type"], p["type"]: self.media.prepare(p, where)}
                     if isinstance(p, dict) and p.get("type") in KINDS else p for p in demo["input"]]
            demo = {**demo, "input": parts}
        message_content(demo["input"], where, self.media, special=self.check_user_text)
        return demo

    def check(self, content, where: str) -> None:
        """Raise EMLoCError for a demo input or query that cannot be rendered, without processing
        its images (cheap: run over every demo before compressing)."""
        message_content(content, where, self.media, prepare=False, special=self.check_user_text)

    def check_demo(self, demo: dict, where: str) -> None:
        """check() of a demo's input, and its output checked as user text."""
        self.check(demo["input"], f"{where} input")
        self.check_user_text(demo["output"], f"{where} output")

    def text_ids(self, text: str) -> list:
        """Plain token ids of a continuation string (no template; control tokens refused)."""
        self.check_user_text(text, "continuation")
        return self._tokenize(text)[0]
