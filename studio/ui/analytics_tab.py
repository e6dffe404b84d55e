"""The analytics tab (its issue has not landed yet)."""

import gradio as gr

from studio.runtime import Studio


def build(studio: Studio) -> None:
    gr.Markdown("This tab is coming soon.")
