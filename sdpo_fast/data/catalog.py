"""Catalog hygiene: from a source's item records to one clean, unique title per item.

The rule (applied by the MovieLens ``u.item`` and RecBole ``.item`` loaders alike):

1. **Clean** each title (``clean_title``): a trailing video/TV marker ``(V)`` / ``(TV)`` is removed,
   then a trailing ``(yyyy)`` (remembered as the item's year when the source has no year of its
   own), then a trailing article moves to the front (``"Usual Suspects, The"`` -> ``"The Usual
   Suspects"``; ``A``/``An`` likewise), whitespace is collapsed.
2. **Drop placeholders**: a title that is empty or, in lower case, one of ``PLACEHOLDER_TITLES``
   (``"unknown"``, and ``"unkonwn"`` as ML-100K spells it). Interactions with a dropped item are
   dropped too (the loaders count them in ``info``).
3. **Duplicate entries**: records with the same cleaned title AND the same (known) year are one item listed
   twice (ML-100K has 18 such ids, e.g. "Chasing Amy" 1997 as 246 and 268); they map to one title,
   so a user's two ratings of it are one interaction (the first counts).
4. **Disambiguate collisions**: when one cleaned title belongs to items of different years, every
   one of them gets its year appended (``"Cape Fear (1962)"``, ``"Cape Fear (1991)"``); items with
   no year among them, or still colliding, get their id (``"Title [id 17]"``). Titles that collide
   with nothing keep no year. So two distinct items never share a title.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

__all__ = ["PLACEHOLDER_TITLES", "Catalog", "build_catalog", "clean_title", "split_title_year"]

PLACEHOLDER_TITLES = frozenset({"unknown", "unkonwn", "n/a", "none", "null", "untitled"})

_MARKER = re.compile(r"\s*\((?:V|TV)\)\s*$")
_YEAR = re.compile(r"\s*\((?P<year>\d{4})\)\s*$")
_ARTICLE = re.compile(r"^(?P<head>.+?), (?P<article>The|A|An)(?P<tail>\s*\(.*\))?$")


def split_title_year(title: str) -> tuple[str, str | None]:
    """``(title without markers and trailing year, the year or None)``, article not yet moved.

    ``"Land Before Time III: The Time of the Great Giving (1995) (V)"`` ->
    ``("Land Before Time III: The Time of the Great Giving", "1995")``.
    """
    title = _MARKER.sub("", title.strip())
    m = _YEAR.search(title)
    if m:
        return title[: m.start()].strip(), m["year"]
    return title, None


def clean_title(title: str) -> str:
    """Step 1 of the module's rule: markers and trailing year removed, trailing article moved front.

    ``"City of Lost Children, The (Cité des enfants perdus, La) (1995)"`` ->
    ``"The City of Lost Children (Cité des enfants perdus, La)"``.
    """
    title, _ = split_title_year(title)
    m = _ARTICLE.match(title)
    if m:
        title = f"{m['article']} {m['head']}{m['tail'] or ''}"
    return " ".join(title.split())


@dataclass
class Catalog:
    """Item id -> unique clean title, and what the rule did.

    Attributes:
        titles: ``{item_id: title}`` for every kept item (duplicate entries share one title).
        dropped: ids whose title is a placeholder.
        duplicates: ``{id: id it was merged into}`` for same-title, same-year entries.
        disambiguated: ``{id: title}`` for the items whose title got a year or id appended.
    """

    titles: dict = field(default_factory=dict)
    dropped: list = field(default_factory=list)
    duplicates: dict = field(default_factory=dict)
    disambiguated: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "catalog_items": len(self.titles),
            "catalog_titles": len(set(self.titles.values())),
            "placeholder_items_dropped": sorted(self.dropped, key=str),
            "duplicate_items_merged": {str(k): str(v) for k, v in self.duplicates.items()},
            "titles_disambiguated": len(self.disambiguated),
        }


def build_catalog(records: Iterable[tuple[object, str, str | None]]) -> Catalog:
    """Apply the module's rule to ``(item_id, raw_title, year_or_None)`` records (source order).

    ``year`` is the source's own year field; when it is not four digits (ML-100K writes ``"V"`` for
    one video release) the year in the title is used.
    """
    cat = Catalog()
    cleaned: dict = {}  # id -> (title, year)
    for item, raw, year in records:
        _, title_year = split_title_year(raw)
        title = clean_title(raw)
        if not title or title.lower() in PLACEHOLDER_TITLES:
            cat.dropped.append(item)
            continue
        year = str(year).strip() if year is not None else None
        if not (year and re.fullmatch(r"\d{4}", year)):
            year = title_year
        cleaned[item] = (title, year)
    first_of: dict = {}
    by_title: dict = defaultdict(list)
    for item, key in cleaned.items():
        if key[1] is not None and key in first_of:  # without a year, equal titles may be distinct items
            cat.duplicates[item] = first_of[key]
            continue
        first_of[key] = item
        by_title[key[0]].append(item)
    for title, items in by_title.items():
        if len(items) == 1:
            cat.titles[items[0]] = title
            continue
        years = [cleaned[i][1] for i in items]
        for item, year in zip(items, years):
            unique_year = year is not None and years.count(year) == 1
            name = f"{title} ({year})" if unique_year else f"{title} [id {item}]"
            cat.titles[item] = name
            cat.disambiguated[item] = name
    # A disambiguated title may equal another item's plain title ("X (1995)" as a real title).
    counts = defaultdict(list)
    for item, title in cat.titles.items():
        counts[title].append(item)
    for title, items in counts.items():
        if len(items) > 1:
            for item in items:
                cat.titles[item] = cat.disambiguated[item] = f"{title} [id {item}]"
    for item, target in cat.duplicates.items():
        cat.titles[item] = cat.titles[target]
    return cat
