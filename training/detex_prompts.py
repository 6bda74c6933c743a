"""DETEX prompt templates with ``{V} {class} {P} {B}`` placeholders and droppable attribute clauses.

DETEX puts each image-specific word next to its attribute word ("... with [P_i] pose in [B_i]
background"), which is what pushes [P_i] towards pose and [B_i] towards background (abstract [V]);
the exact sentence is [R] (spec detex.md §3.1). The template writes each attribute clause in square
brackets so that one template yields every prompt the joint training and inference need::

    photo of a {V} {class}[ with {P} pose][ in {B} background]
      full            → "photo of a <V> dog with <P> pose in <B> background"
      no background   → "photo of a <V> dog with <P> pose"
      subject only    → "photo of a <V> dog"

``{V}`` (the subject word) must appear once outside the clauses, ``{P}`` and ``{B}`` once each inside
their own clause; ``{class}`` is the class noun. Rendering substitutes caller-given strings (placeholder
words during training, ``embedding:`` names at inference) and drops a clause whose word is None.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

DEFAULT_TEMPLATE = "photo of a {V} {class}[ with {P} pose][ in {B} background]"
SUBJECT, CLASS, POSE, BACKGROUND = "{V}", "{class}", "{P}", "{B}"
_PLACEHOLDER = re.compile(r"\{[^{}]*\}")
_CLAUSE = re.compile(r"\[([^\[\]]*)\]")


class TemplateError(ValueError):
    """The prompt template does not have the placeholders DETEX needs."""


@dataclass(frozen=True)
class PromptTemplate:
    #: the template as written
    text: str
    #: (start, end) character spans of the clause holding {P} / {B}, brackets included; None if absent
    pose_clause: Optional[tuple[int, int]]
    background_clause: Optional[tuple[int, int]]

    @classmethod
    def parse(cls, text: str, require_attributes: bool = True) -> "PromptTemplate":
        """Validate ``text``; with ``require_attributes`` the {P} and {B} clauses must both exist."""
        unknown = sorted(set(_PLACEHOLDER.findall(text)) - {SUBJECT, CLASS, POSE, BACKGROUND})
        if unknown:
            raise TemplateError(f"unknown placeholder(s) {unknown} in the template {text!r}; use {{V}} {{class}} {{P}} {{B}}")
        outside = _CLAUSE.sub("", text)
        if "[" in outside or "]" in outside:
            raise TemplateError(f"unbalanced or nested [ ] in the template {text!r}; write each attribute clause "
                                "as [ ... {P} ... ] without nesting")
        if text.count(SUBJECT) != 1 or outside.count(SUBJECT) != 1:
            raise TemplateError(f"the template {text!r} must contain {{V}} exactly once, outside the [ ] clauses")
        if text.count(CLASS) > 1:
            raise TemplateError(f"the template {text!r} may contain {{class}} at most once")
        spans = {}
        for match in _CLAUSE.finditer(text):
            body = match.group(1)
            found = [p for p in (POSE, BACKGROUND) if p in body]
            if len(found) != 1 or body.count(found[0]) != 1 or SUBJECT in body:
                raise TemplateError(f"each [ ] clause must hold exactly one of {{P}} or {{B}} (and not {{V}}); "
                                    f"got [{body}] in {text!r}")
            if found[0] in spans:
                raise TemplateError(f"{found[0]} appears in two clauses of {text!r}")
            spans[found[0]] = match.span()
        for placeholder in (POSE, BACKGROUND):
            if text.count(placeholder) > (1 if placeholder in spans else 0):
                raise TemplateError(f"{placeholder} must sit inside a [ ] clause, once, in {text!r}")
            if require_attributes and placeholder not in spans:
                raise TemplateError(f"the training template {text!r} needs a clause with {placeholder}, "
                                    f"e.g. {DEFAULT_TEMPLATE!r}")
        return cls(text, spans.get(POSE), spans.get(BACKGROUND))

    def render(self, subject: str, class_word: str, pose: Optional[str] = None,
               background: Optional[str] = None) -> str:
        """The prompt with the placeholders filled; a clause whose word is None is left out."""
        for word, span, placeholder in ((pose, self.pose_clause, POSE), (background, self.background_clause, BACKGROUND)):
            if word is not None and span is None:
                raise TemplateError(f"the template {self.text!r} has no [ ] clause with {placeholder} to keep")
        pieces, cursor = [], 0
        for span, word, placeholder in sorted(
                ((s, w, p) for s, w, p in ((self.pose_clause, pose, POSE), (self.background_clause, background, BACKGROUND))
                 if s is not None), key=lambda item: item[0]):
            pieces.append(self.text[cursor:span[0]])
            if word is not None:
                pieces.append(self.text[span[0] + 1:span[1] - 1].replace(placeholder, word))
            cursor = span[1]
        pieces.append(self.text[cursor:])
        return "".join(pieces).replace(SUBJECT, subject).replace(CLASS, class_word)
