"""Prompt templates (text files in ``prompts/``) rendered into TRL's prompt/completion form.

A template file has a YAML front matter between ``---`` lines (``history_item``,
``history_separator``, ``completion``, ``answer_prefix``, comments) and then the prompt body with the
placeholders ``{noun}`` and ``{history}``. The body ends with the answer prefix; the completion is
the target title in the template's completion format (``"{title}"\\n`` for D3), and the tokenizer's
EOS closes it when tokenized.

Shipped templates: ``d3`` (verbatim D3/BIGRec/LatentR3 wording, typos included, for comparability)
and ``clean``. ``use_chat_template=True`` wraps the prompt as a user turn with the tokenizer's chat
template (the answer then follows the assistant header directly).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from llmrec.resources import resource_dir

_PLACEHOLDER = re.compile(r"\{noun\}|\{history\}")

TEMPLATE_KEYS = {"description", "history_item", "history_separator", "completion", "answer_prefix"}


class PromptError(ValueError):
    """A template file that cannot be used, or an example that cannot be rendered."""


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    body: str
    history_item: str = '"{title}"'
    history_separator: str = ", "
    completion_format: str = '"{title}"\n'
    answer_prefix: str = ""
    description: str = ""

    @classmethod
    def load(cls, name_or_path: str) -> PromptTemplate:
        """Load ``d3`` / ``clean`` (shipped) or a path to a template file.

        A shipped name wins over a file or folder of that name in the working directory (every recipe's default
        ``prompt: d3`` must not depend on where it runs); write ``./d3`` to mean such a file.
        """
        shipped = resource_dir("prompts") / f"{name_or_path}.txt"
        path = shipped if shipped.is_file() and "/" not in str(name_or_path) else Path(name_or_path)
        if not path.exists():
            known = sorted(p.stem for p in resource_dir("prompts").glob("*.txt"))
            raise PromptError(f"prompt template '{name_or_path}' not found (shipped: {', '.join(known)})")
        if not path.is_file():
            raise PromptError(f"prompt template {path} is not a file")
        # Windows line endings (an editor's) read as the plain ones; "\r" is not part of any prompt
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
        if not text.startswith("---\n") or "\n---\n" not in text[3:]:
            raise PromptError(f"{path}: expected a '---' front matter block before the prompt body")
        head, body = text[4:].split("\n---\n", 1)
        try:
            meta = yaml.safe_load(head) or {}
        except yaml.YAMLError as e:
            raise PromptError(f"{path}: bad front matter ({e})") from None
        if not isinstance(meta, dict):
            raise PromptError(f"{path}: the front matter must be key: value lines")
        unknown = set(meta) - TEMPLATE_KEYS
        if unknown:
            raise PromptError(f"{path}: unknown front matter keys {sorted(unknown)}")
        not_text = sorted(k for k, v in meta.items() if not isinstance(v, str))
        if not_text:  # `completion: null` loaded and failed later with an AttributeError
            raise PromptError(f"{path}: front matter {not_text} must be text (quote it)")
        for key in ("history_item", "completion"):
            # a typo such as {titel} made every history item, or every answer, the same literal text: the model
            # trained on it without a word
            if key in meta and "{title}" not in meta[key]:
                raise PromptError(f"{path}: {key} {meta[key]!r} has no {{title}} placeholder")
        if "{history}" not in body:
            raise PromptError(f"{path}: the body has no {{history}} placeholder")
        tpl = cls(
            name=path.stem,
            body=body,
            history_item=meta.get("history_item", '"{title}"'),
            history_separator=meta.get("history_separator", ", "),
            completion_format=meta.get("completion", '"{title}"\n'),
            answer_prefix=meta.get("answer_prefix", ""),
            description=meta.get("description", ""),
        )
        if tpl.answer_prefix and not body.endswith(tpl.answer_prefix):
            raise PromptError(f"{path}: the body does not end with answer_prefix {tpl.answer_prefix!r}")
        return tpl

    def render_prompt(self, history_titles: list[str], noun: str = "items") -> str:
        if not history_titles:
            raise PromptError("cannot render a prompt for an empty history")
        history = self.history_separator.join(self.history_item.replace("{title}", t) for t in history_titles)
        # One pass over the body, not str.format (titles may contain braces) nor two replaces (a noun holding
        # "{history}" had the history put inside it).
        values = {"{noun}": noun, "{history}": history}
        return _PLACEHOLDER.sub(lambda m: values[m.group(0)], self.body)

    def render_completion(self, title: str) -> str:
        return self.completion_format.replace("{title}", title)


def wrap_chat(tokenizer, prompt: str) -> str:
    """Put ``prompt`` in a user turn of the tokenizer's chat template, ready for the answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError("use_chat_template is set but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def render_example(
    template: PromptTemplate,
    history_titles: list[str],
    target_title: str | None = None,
    noun: str = "items",
    tokenizer=None,
    use_chat_template: bool = False,
) -> dict[str, str]:
    """One sample -> TRL's ``{"prompt": ..., "completion": ...}`` (completion empty when no target)."""
    prompt = template.render_prompt(history_titles, noun)
    if use_chat_template:
        prompt = wrap_chat(tokenizer, prompt)
    completion = template.render_completion(target_title) if target_title is not None else ""
    return {"prompt": prompt, "completion": completion}


def check_titles_are_plain_text(tokenizer, titles, item_ids, where: str) -> None:
    """Refuse a catalogue whose titles contain one of the tokenizer's special or added tokens (``<|endoftext|>``, a
    chat marker, a latent thought token, SmolLM2's ``<file_sep>``): tokenizing the text reads it as that control token, so the prompt would hold an
    end of sequence or a latent position in mid-history, and the title's answer an EOS before its end. ``where``
    names the catalogue (its file) in the error.
    """
    # Added tokens (SmolLM2's "<file_sep>", ...) are matched in text as special ones are, special or not.
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    specials = sorted({t for t in [*getattr(tokenizer, "all_special_tokens", []), *added] if t}, key=len,
                      reverse=True)
    for item_id, title in zip(item_ids, titles, strict=True):
        hit = next((t for t in specials if t in title), None) if title else None
        if hit is not None:
            raise PromptError(f"{where}: item {item_id}'s title {title!r} contains the tokenizer's special token "
                              f"{hit!r}, which tokenizing reads as that control token, not as text; edit the title "
                              "or remove the item")


def encode(tokenizer, text: str, first: bool) -> list[int]:
    """Token ids of a text piece; special tokens (BOS) only on the first piece, as D3 concatenates parts, and not
    when the text already opens with the BOS token (a chat template that writes it, as Llama 3's): never two."""
    bos = getattr(tokenizer, "bos_token", None)
    if first and bos and text.startswith(bos):
        first = False
    return tokenizer(text, add_special_tokens=first)["input_ids"]


def render_to_fit(
    template: PromptTemplate,
    tokenizer,
    history_titles: list[str],
    target_title: str | None,
    max_length: int,
    noun: str = "items",
    use_chat_template: bool = False,
) -> tuple[dict[str, str], int]:
    """Render, dropping the oldest history items until prompt + completion + EOS fit ``max_length``.

    The history is truncated from the left, never the answer: a row whose answer cannot fit even
    with a single history item raises :class:`PromptError`. Returns the example and how many
    history items were dropped.
    """
    completion_len = 0
    if target_title is not None:
        completion_len = len(encode(tokenizer, template.render_completion(target_title), first=False)) + 1
    dropped = 0
    hist = list(history_titles)
    while True:
        ex = render_example(template, hist, target_title, noun, tokenizer, use_chat_template)
        n = len(encode(tokenizer, ex["prompt"], first=True)) + completion_len
        if n <= max_length:
            return ex, dropped
        if len(hist) == 1:
            raise PromptError(
                f"prompt with a single history item and its answer needs {n} tokens > max_length {max_length}"
            )
        hist = hist[1:]
        dropped += 1
