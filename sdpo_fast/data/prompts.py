"""Prompt templates in the paper's style, a few per domain, one chosen per example by seed.

Every template ends with ``"Answer:"``; the completion is ``" " + title`` (``completion_text``), so a
candidate's tokens are the same whether they follow the prompt in training, in ranking, or are
generated. History and candidate titles are joined with ``", "`` as in the paper's code.
"""

from __future__ import annotations

from typing import Sequence

from .examples import DOMAINS, RecExample, stable_seed

__all__ = ["TEMPLATES", "HISTORY_TEMPLATES", "format_prompt", "completion_text", "template_index"]

# Placeholders: {past} {present} {noun} {nouns} (DOMAINS words), {history}, {candidates}, {n}.
TEMPLATES: tuple[str, ...] = (
    "This user has {past} {history} in the previous. Please predict the next {noun} this user will "
    "{present}. Choose the answer from the following {n} {noun} titles: {candidates}. Answer:",
    "Given the {nouns} this user has {past} before: {history}. Which {noun} will the user {present} "
    "next? The {noun} candidates to recommend are: {candidates}. Choose only one {noun} from the "
    "candidates. Answer:",
    "The user {past} the following {nouns} in order: {history}. Recommend the next {noun} for this user "
    "from these {n} candidates: {candidates}. Answer:",
)

# The same wordings without the candidate list (template k here is TEMPLATES[k] without its choice
# set): the prompt of full-catalog ranking, where every catalog item is a candidate.
HISTORY_TEMPLATES: tuple[str, ...] = (
    "This user has {past} {history} in the previous. Please predict the next {noun} this user will {present}. Answer:",
    "Given the {nouns} this user has {past} before: {history}. Which {noun} will the user {present} next? Answer:",
    "The user {past} the following {nouns} in order: {history}. Recommend the next {noun} for this user. Answer:",
)


def template_index(example: RecExample, seed: int = 0, template: int | None = None) -> int:
    """The template used for ``example``: ``template`` if given, else a stable hash of
    ``(seed, example_id)`` (the same example always gets the same wording for a given seed)."""
    if template is not None:
        if not 0 <= template < len(TEMPLATES):
            raise ValueError(f"template must be in [0, {len(TEMPLATES)}), got {template}")
        return template
    return stable_seed("prompt", seed, example.example_id or example.user_id) % len(TEMPLATES)


def format_prompt(
    example: RecExample,
    *,
    seed: int = 0,
    template: int | None = None,
    history: Sequence[str] | None = None,
    list_candidates: bool = True,
) -> str:
    """The prompt text of ``example``.

    Args:
        seed: picks the template per example (``template_index``).
        template: force one template for every example.
        history: override the history (the tokeniser passes a shortened one when truncating).
        list_candidates: False uses ``HISTORY_TEMPLATES`` (no candidate list; same template index).
    """
    words = DOMAINS[example.domain]
    history = example.history if history is None else history
    templates = TEMPLATES if list_candidates else HISTORY_TEMPLATES
    return templates[template_index(example, seed, template)].format(
        history=", ".join(history) if history else "nothing yet",
        candidates=", ".join(example.candidates),
        n=len(example.candidates),
        **words,
    )


def completion_text(title: str) -> str:
    """What follows ``"Answer:"``: one space, then the title (the EOS token is added by the tokeniser)."""
    return " " + title
