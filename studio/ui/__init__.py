"""The Gradio Blocks app: a tab per registered modality (modalities with the same title share one tab, a sub-tab
each), then Analytics and Models. Each tab lives in its own module."""

from __future__ import annotations

import gradio as gr

from studio import modalities
from studio.runtime import Studio
from studio.ui import analytics_tab, models_tab
from studio.ui.controls import handing_off


def build_ui(studio: Studio) -> gr.Blocks:
    with gr.Blocks(title="GenAI Studio", analytics_enabled=studio.settings.analytics) as demo:
        gr.Markdown("# GenAI Studio\nChat, speech, images with LoRA adapters and 3D, from models on this machine.")
        if studio.notice:
            gr.Markdown(f"> **Offline mode.** {studio.notice}", elem_id="profile-notice")
        tabs: dict[str, list[modalities.Modality]] = {}
        for modality in modalities.registered():
            if modality.tab:
                tabs.setdefault(modality.title, []).append(modality)
        with gr.Tabs() as tab_bar, handing_off(tab_bar) as handoffs:
            for title, members in tabs.items():
                handoffs.tab = title.lower()
                with gr.Tab(title, id=title.lower()):
                    if len(members) == 1:
                        modalities.resolve(members[0].tab)(studio)
                        continue
                    for member in members:
                        with gr.Tab(member.subtitle or member.name, id=member.name):
                            modalities.resolve(member.tab)(studio)
            with gr.Tab("Analytics", id="analytics"):
                analytics_tab.build(studio)
            with gr.Tab("Models", id="models"):
                models_tab.build(studio)
    return demo
