"""The Models tab: what the cache holds right now, with unload buttons."""

from __future__ import annotations

from dataclasses import asdict

import gradio as gr
import pandas as pd

from studio.config import format_size
from studio.runtime import Studio, describe

COLUMNS = ["model", "modality", "state", "size", "KV cache", "in use", "batch", "waiting", "idle s", "load s"]


def _table(studio: Studio) -> tuple[pd.DataFrame, str, dict]:
    snap = studio.cache.snapshot()
    rows = [[m.id, m.modality, m.state, format_size(m.bytes), format_size(m.workspace_bytes) if m.workspace_bytes
             else "", m.pins, "" if m.running is None else m.running, "" if m.waiting is None else m.waiting,
             m.idle_seconds, m.load_seconds] for m in snap.models]
    summary = (f"**{describe(studio)}** · used {format_size(snap.used_bytes)} of {format_size(snap.budget_bytes)} "
               f"(peak {format_size(snap.peak_bytes)}) · hits {snap.hits} · misses {snap.misses} · "
               f"loads {snap.loads} · failed loads {snap.load_failures} · evictions {snap.evictions} · "
               f"load time {snap.load_seconds:.1f} s")
    resident = [m.id for m in snap.models if m.state == "resident"]
    return pd.DataFrame(rows, columns=COLUMNS), summary, gr.update(choices=resident, value=None)


def build(studio: Studio) -> None:
    summary = gr.Markdown()
    table = gr.Dataframe(headers=COLUMNS, interactive=False, label="Resident models")
    with gr.Row():
        choice = gr.Dropdown(label="Model", choices=[], scale=3)
        unload = gr.Button("Unload", scale=1)
        free_all = gr.Button("Free all", variant="stop", scale=1)
        refresh = gr.Button("Refresh", scale=1)
    gr.Markdown("Registered models: " + ", ".join(
        f"`{s.id}` ({s.modality}{', ' + s.stands_for if s.stands_for else ''})" for s in studio.registry))

    def show():
        return _table(studio)

    def models_status() -> dict:
        """The model cache's state: resident models with their size and pins, hits, misses, loads, evictions."""
        return asdict(studio.cache.snapshot())

    def unload_one(model_id: str | None):
        if not model_id:
            raise gr.Error("Pick a resident model to unload.")
        if not studio.cache.unload(model_id):
            gr.Warning(f"{model_id} is in use or no longer resident; try again when its request ends.")
        return _table(studio)

    def unload_all():
        freed = studio.cache.clear()
        gr.Info(f"Unloaded {len(freed)} model(s).")
        return _table(studio)

    outputs = [table, summary, choice]
    gr.on(None, show, outputs=outputs, api_visibility="private", show_progress="hidden")  # None: on page load
    gr.on([refresh.click, gr.Timer(5).tick], show, outputs=outputs, api_visibility="private", show_progress="hidden")
    unload.click(unload_one, choice, outputs, api_visibility="private")
    free_all.click(unload_all, None, outputs, api_visibility="private")
    gr.api(models_status, api_name="models")
