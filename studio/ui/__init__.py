"""The Gradio Blocks app: one tab per modality, plus Analytics and Models. Each tab lives in its own module."""

from __future__ import annotations

import gradio as gr

from studio.runtime import Studio
from studio.ui import analytics_tab, chat_tab, image_tab, models_tab, shape_tab, speech_tab

TABS = (("Chat", chat_tab), ("Speech", speech_tab), ("Image", image_tab), ("3D", shape_tab),
        ("Analytics", analytics_tab), ("Models", models_tab))


def build_ui(studio: Studio) -> gr.Blocks:
    with gr.Blocks(title="GenAI Studio", analytics_enabled=studio.settings.analytics) as demo:
        gr.Markdown("# GenAI Studio\nChat, speech, images with LoRA adapters and 3D, from models on this machine.")
        if studio.notice:
            gr.Markdown(f"> **Offline mode.** {studio.notice}", elem_id="profile-notice")
        for title, module in TABS:
            with gr.Tab(title, id=title.lower()):
                module.build(studio)
    return demo
