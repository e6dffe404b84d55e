"""The Image tab's LoRA cards: what the picker offers for a model, the cards shown under it, and the trigger words
the picked adapters want in the prompt. Pure functions of the adapters found on disk, tested without a browser."""

from __future__ import annotations

import base64
import html
import io
from functools import lru_cache
from pathlib import Path

from PIL import Image

from studio.backends.lora import LoraInfo, base_label, fits
from studio.config import format_size

THUMBNAIL = 96  # pixels, a card's preview
TAGS_SHOWN = 8


def choices(infos: list[LoraInfo], base: str | None) -> list[tuple[str, str]]:
    """(label, name) of the usable adapters made for the model's family (or of unknown family), for the picker."""
    return [(_label(info), info.name) for info in infos if not info.error and fits(info, base)]


def _label(info: LoraInfo) -> str:
    words = f" · {', '.join(info.card.trigger_words)}" if info.card.trigger_words else ""
    return f"{info.name}{words}"


def missing_triggers(prompt: str, picked: list[str], infos: list[LoraInfo]) -> list[str]:
    """The trigger words of the picked adapters that the prompt does not contain yet, each once."""
    by_name = {info.name: info for info in infos}
    found: list[str] = []
    for name in picked:
        for word in by_name[name].card.trigger_words if name in by_name else ():
            if word.lower() not in (prompt or "").lower() and word not in found:
                found.append(word)
    return found


def with_triggers(prompt: str, words: list[str]) -> str:
    return ", ".join(part for part in [(prompt or "").strip(), *words] if part)


def preferred_weight(name: str, infos: list[LoraInfo]) -> float:
    return next((info.card.preferred_weight for info in infos if info.name == name), 1.0)


def cards_html(infos: list[LoraInfo], base: str | None, model: str, family: str) -> str:
    """Every adapter as a card (preview, family, format and size, trigger words, training tags, weight, note);
    those made for another family, and unusable files, greyed out with the reason."""
    if not infos:
        return ""
    cards = []
    for info in infos:
        why = info.error or (None if fits(info, base) else
                             f"made for {base_label(info.base)}, {model} is {family}" if base else
                             f"{model} ({family}) takes no LoRA adapters")
        card = info.card
        thumb = (f'<img src="{_thumbnail(card.preview, card.preview.stat().st_mtime_ns)}" alt="">' if card.preview
                 else '<div class="lora-noimg">no preview</div>')
        made_for = base_label(info.base) if info.base else "family unknown"
        facts = [f"<b>{html.escape(info.name)}</b>",
                 f"<span>{html.escape(made_for)} · {info.format} · {format_size(info.path.stat().st_size)}</span>"]
        if card.trigger_words:
            facts.append(f"<span>trigger: <code>{html.escape(', '.join(card.trigger_words))}</code></span>")
        if card.tags:
            tags = ", ".join(f"{html.escape(tag)} ({count})" for tag, count in card.tags[:TAGS_SHOWN])
            facts.append(f"<span class='lora-tags'>tags: {tags}</span>")
        facts.append(f"<span>weight {card.preferred_weight:g}</span>")
        if card.note:
            facts.append(f"<span class='lora-note'>{html.escape(card.note)}</span>")
        if why:
            facts.append(f"<span class='lora-why'>{html.escape(why)}</span>")
        state = "lora-card lora-off" if why else "lora-card"
        cards.append(f'<div class="{state}" data-lora="{html.escape(info.name)}">{thumb}'
                     f'<div class="lora-facts">{"".join(facts)}</div></div>')
    return f"<style>{CSS}</style><div class='lora-cards'>{''.join(cards)}</div>"


@lru_cache(maxsize=256)
def _thumbnail(path: Path, _mtime: int) -> str:
    """A preview as a small inline PNG (the page fetches nothing; a changed file has a new mtime)."""
    with Image.open(path) as image:
        small = image.convert("RGB")
        small.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


CSS = """
.lora-cards {display: flex; flex-wrap: wrap; gap: 8px;}
.lora-card {display: flex; gap: 8px; width: 300px; padding: 6px; border: 1px solid var(--border-color-primary);
            border-radius: 8px; font-size: 0.85em;}
.lora-card img, .lora-noimg {width: 72px; height: 72px; object-fit: cover; border-radius: 6px; flex: none;}
.lora-noimg {display: flex; align-items: center; justify-content: center; background: var(--background-fill-secondary);
             color: var(--body-text-color-subdued); font-size: 0.8em; text-align: center;}
.lora-facts {display: flex; flex-direction: column; gap: 2px; overflow: hidden;}
.lora-off {opacity: 0.45;}
.lora-why {color: var(--error-text-color);}
.lora-tags, .lora-note {color: var(--body-text-color-subdued);}
"""
