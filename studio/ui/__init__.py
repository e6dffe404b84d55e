"""The Gradio Blocks app: a tab per registered modality (modalities with the same title share one tab, a sub-tab
each, and so do the views below), then Analytics and Models. Each tab lives in its own module."""

from __future__ import annotations

from typing import Callable

import gradio as gr

from studio import modalities
from studio.runtime import Studio
from studio.ui import analytics_tab, models_tab, voice_chat_tab
from studio.ui.controls import OUTPUTS_KEPT_S, handing_off

# Views that use several modalities at once, each a sub-tab of the tab with its title: (title, label, id, build).
VIEWS: tuple[tuple[str, str, str, Callable[[Studio], None]], ...] = (
    ("Chat", "Voice chat", "voice-chat", voice_chat_tab.build),
)


def build_ui(studio: Studio) -> gr.Blocks:
    with gr.Blocks(title="GenAI Studio", analytics_enabled=studio.settings.analytics,
                   delete_cache=(OUTPUTS_KEPT_S, OUTPUTS_KEPT_S)) as demo:
        gr.Markdown("# GenAI Studio\nChat, speech, images and video with LoRA adapters, and 3D, from models on this "
                    "machine.")
        if studio.notice:  # one line until opened: on a phone it would fill the first screen
            with gr.Accordion("Offline mode: small random-weight stand-ins (the tiny profile)", open=False,
                              elem_id="profile-notice"):
                gr.Markdown(studio.notice)
        tabs: dict[str, list[tuple[str, str, modalities.Ref]]] = {}  # title -> (label, id, build) of each part
        for modality in modalities.registered():
            if modality.tab:
                tabs.setdefault(modality.title, []).append((modality.subtitle or modality.name, modality.name,
                                                            modality.tab))
        for title, label, view_id, build in VIEWS:
            tabs.setdefault(title, []).append((label, view_id, build))
        # Tabs that do not fit wrap onto a second row (on a phone too), never into a "…" menu: one tap each.
        with gr.Tabs(overflow_behavior="wrap") as tab_bar, handing_off(tab_bar) as handoffs:
            for title, members in tabs.items():
                handoffs.tab = title.lower()
                with gr.Tab(title, id=title.lower()):
                    if len(members) == 1:
                        modalities.resolve(members[0][2])(studio)
                        continue
                    with gr.Tabs(overflow_behavior="wrap"):
                        for label, part_id, build in members:
                            with gr.Tab(label, id=part_id):
                                modalities.resolve(build)(studio)
            with gr.Tab("Analytics", id="analytics"):
                analytics_tab.build(studio)
            with gr.Tab("Models", id="models"):
                models_tab.build(studio)
    return demo
