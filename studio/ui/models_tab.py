"""The Models tab: every model of the studio (built-in, user catalog, drop-in, external) with its size, disk use,
fit and state; unload, keep loaded, remove from disk, free all (both removals ask first); Refresh for the drop-in
folders; and Add a model, with a progress bar for its download that can be cancelled.

Layout in `build`, named handlers below it, the wiring at the end; everything goes through `studio.manager`,
as `/models` does.
"""

from __future__ import annotations

import html
import time
from dataclasses import asdict
import gradio as gr
import pandas as pd

from studio import modalities
from studio.config import format_size
from studio.manager import ModelInfo, Plan
from studio.quantization import QUANTIZE_CHOICES
from studio.runtime import Studio
from studio.ui.controls import shown_to_user

COLUMNS = ["model", "label", "modality", "family", "state", "size", "fits", "disk", "in use", "batch", "KV cache",
           "kept", "last used", "origin", "source"]
ALL = "all"
NO_QUANTIZATION = "none"
TABLE_EVERY_S = 5
PROGRESS_EVERY_S = 1


# ---------------------------------------------------------------------------------------------- what it shows


def summary(studio: Studio) -> str:
    """The cache in one line, each figure bold (units with it), and a line when nothing is loaded."""
    snap = studio.cache.snapshot()
    line = (f"Device **{snap.device}** · strategy **{snap.strategy}** · memory **{format_size(snap.used_bytes)}** "
            f"of **{format_size(snap.budget_bytes)}** (peak **{format_size(snap.peak_bytes)}**) · "
            f"hits **{snap.hits}** · loads **{snap.loads}** · failed loads **{snap.load_failures}** · "
            f"evictions **{snap.evictions}** · load time **{snap.load_seconds:.1f} s**")
    if not any(m.state == "resident" for m in snap.models):
        line += "\n\nNothing is loaded: a model loads on its first use (or Keep loaded below)."
    return line


def _disk(info: ModelInfo) -> str:
    if info.external:
        return "–"
    if info.on_disk:
        return format_size(info.disk_bytes) if info.disk_bytes else "bundled"
    return f"not downloaded ({format_size(info.disk_bytes)} partial)" if info.disk_bytes else "not downloaded"


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    ago = time.time() - seconds
    return f"{ago:.0f} s ago" if ago < 120 else f"{ago / 60:.0f} min ago" if ago < 7200 else f"{ago / 3600:.0f} h ago"


def rows(studio: Studio, modality: str) -> pd.DataFrame:
    infos = studio.manager.catalog(None if modality == ALL else modality)
    return pd.DataFrame([[m.id, m.label, m.modality, m.family or "–", m.state,
                          "–" if m.external else format_size(m.size_bytes), "yes" if m.fits_budget else "no",
                          _disk(m), m.in_use, _batch(m), format_size(m.workspace_bytes) if m.workspace_bytes else "",
                          "yes" if m.keep_loaded else "", _ago(m.last_used), m.origin, m.source] for m in infos],
                        columns=COLUMNS)


def _batch(info: ModelInfo) -> str:
    """Sequences in the model's batch now, and requests waiting for a slot (models that batch)."""
    if info.running is None:
        return ""
    return f"{info.running} + {info.waiting} waiting" if info.waiting else str(info.running)


def problems(studio: Studio) -> str:
    found = studio.manager.problems
    if not found:
        return ""
    return "**Left out:**\n" + "\n".join(f"- `{p.where}`: {p.message}" for p in found)


def progress_bar(status: dict | None) -> str:
    """The download's bar: bytes, speed and time left; how it ended once it did."""
    if status is None:
        return ""
    done, total = status["done_bytes"], status["total_bytes"]
    text = f"{format_size(done)} of {format_size(total)} · {format_size(status['bytes_per_s'])}/s"
    if status["seconds_left"] is not None:
        text += f" · {status['seconds_left']:.0f} s left"
    ending = {"done": f"✅ Added <b>{status['model']}</b>: pick it in its tab.",
              "cancelled": f"Cancelled: {status['model']} was not added (its finished files stay in the cache, so "
                           "adding it again fetches only the rest).",
              "failed": f"❌ {status['model']} was not added: {html.escape(status['error'] or '')}"}
    return (f'<div id="add-status" data-state="{status["state"]}"><progress value="{done}" max="{max(total, 1)}" '
            f'style="width:100%"></progress><div>{text}</div><div>{ending.get(status["state"], "")}</div></div>')


def plan_text(plan: Plan) -> str:
    fits = "fits" if plan.size_bytes <= plan.budget_bytes else "does not fit"
    fetch = (f"downloads **{format_size(plan.download_bytes)}** ({format_size(plan.free_disk_bytes)} free on disk)"
             if plan.download_bytes else "nothing to download")
    quantized = f" quantized {plan.spec.quantize}" if plan.spec.quantize else ""
    return (f"**{plan.spec.id}** · {plan.spec.modality} · {plan.family_label} · needs "
            f"**{format_size(plan.size_bytes)}** of memory at {plan.dtype}{quantized} ({fits} the "
            f"{format_size(plan.budget_bytes)} budget) · {fetch}")


# ---------------------------------------------------------------------------------------------- the tab


def build(studio: Studio) -> None:
    manager = studio.manager
    summary_md = gr.Markdown(elem_id="models-summary")
    with gr.Row():
        shown = gr.Radio([ALL, *modalities.names()], value=ALL, label="Modality", scale=3)
        refresh = gr.Button("Refresh", scale=1, elem_id="models-refresh")
    table = gr.Dataframe(headers=COLUMNS, interactive=False, label="Models", elem_id="models-table", wrap=True)
    left_out = gr.Markdown(elem_id="models-problems")
    with gr.Row():
        choice = gr.Dropdown([spec.id for spec in studio.registry], value=None, label="Model", scale=3,
                             elem_id="models-choice")
        keep = gr.Checkbox(label="Keep loaded", scale=1, elem_id="models-keep")
        unload = gr.Button("Unload", scale=1)
        remove = gr.Button("Remove from disk", variant="stop", scale=1, elem_id="models-remove")
        free_all = gr.Button("Free all", variant="stop", scale=1, elem_id="models-free-all")
    with gr.Row(visible=False, elem_id="models-confirm") as confirm_row:
        confirm_text = gr.Markdown()
        yes = gr.Button("Yes", variant="stop", scale=0, elem_id="models-confirm-yes")
        no = gr.Button("Cancel", scale=0, elem_id="models-confirm-no")
    pending = gr.State(None)  # what the confirmation is about: ("remove", id) or ("free", None)

    gr.Markdown("### Add a model\nA Hub repo id (`org/name`) or a folder or file on this machine. **Check** reads "
                "its metadata (family, size, download); **Download and add** fetches it and adds it to the user "
                f"catalog (`{studio.settings.models_file}`).")
    with gr.Row():
        source = gr.Textbox(label="Hub repo id or local path", placeholder="Qwen/Qwen2.5-0.5B-Instruct", scale=4,
                            elem_id="add-source")
        new_id = gr.Textbox(label="Id (optional)", scale=2, elem_id="add-id")
        quantize = gr.Dropdown([NO_QUANTIZATION, *QUANTIZE_CHOICES], value=NO_QUANTIZATION, label="Quantize",
                               scale=1, elem_id="add-quantize")
    with gr.Row():
        check = gr.Button("Check", scale=1, elem_id="add-check")
        add = gr.Button("Download and add", variant="primary", scale=1, elem_id="add-go")
        cancel = gr.Button("Cancel download", scale=1, elem_id="add-cancel")
    plan_md = gr.Markdown(elem_id="add-plan")
    progress = gr.HTML(elem_id="add-progress")
    adding = gr.State(None)  # the id being added
    poll = gr.Timer(PROGRESS_EVERY_S, active=False)

    # ------------------------------------------------------------------------------------------ handlers

    def show(modality: str, current: str | None):
        ids = [spec.id for spec in studio.registry]
        return (summary(studio), rows(studio, modality), problems(studio),
                gr.update(choices=ids, value=current if current in ids else None))

    def picked(model_id: str | None) -> bool:
        return bool(model_id) and model_id in studio.cache.kept()

    def from_table(modality: str, event: gr.SelectData) -> str:
        return rows(studio, modality).iloc[event.index[0]]["model"]

    def set_keep(model_id: str | None, on: bool, progress=gr.Progress(track_tqdm=True)):
        if not model_id:
            raise gr.Error("Pick a model first.", print_exception=False)
        with shown_to_user():
            manager.keep(model_id, on)
        gr.Info(f"{model_id} is kept loaded." if on else f"{model_id} is no longer kept loaded.")

    def unload_one(model_id: str | None) -> None:
        if not model_id:
            raise gr.Error("Pick a model to unload.", print_exception=False)
        with shown_to_user():
            if not manager.unload(model_id):
                gr.Info(f"{model_id} was not loaded.")

    def ask(action: str, model_id: str | None):
        if action == "remove":
            if not model_id:
                raise gr.Error("Pick a model to remove from disk.", print_exception=False)
            info = next(m for m in manager.catalog() if m.id == model_id)
            question = (f"Remove **{model_id}** from disk? It frees {format_size(info.disk_bytes)}"
                        f"{' and takes it out of the user catalog' if info.origin == 'catalog' else ''}.")
        else:
            question = "Unload every idle model (models kept loaded stay)?"
        return (action, model_id), gr.update(visible=True), question

    def confirmed(what: tuple | None):
        hidden = gr.update(visible=False)
        if not what:
            return None, hidden
        action, model_id = what
        with shown_to_user():
            if action == "remove":
                removal = manager.remove(model_id)
                gr.Info(f"Removed {model_id}: freed {format_size(removal.freed_bytes)}.")
            else:
                freed = studio.cache.clear()
                gr.Info(f"Unloaded {len(freed)} model(s).")
        return None, hidden

    def rescan() -> None:
        added, removed = manager.refresh()
        gr.Info(f"Drop-in folders scanned: {len(added)} added, {len(removed)} removed.")

    def plan_from(source_text: str, model_id: str, quantization: str):
        with shown_to_user():
            return manager.plan(source_text, model_id=model_id or None,
                                quantize=None if quantization == NO_QUANTIZATION else quantization)

    def check_source(source_text: str, model_id: str, quantization: str) -> str:
        return plan_text(plan_from(source_text, model_id, quantization))

    def start_adding(source_text: str, model_id: str, quantization: str):
        plan = plan_from(source_text, model_id, quantization)
        with shown_to_user():
            job = manager.add(plan)
        return plan_text(plan), plan.spec.id, progress_bar(job.status()), gr.Timer(active=not job.finished)

    def watch(model_id: str | None):
        job = manager.download(model_id) if model_id else None
        status = job.status() if job else None
        return progress_bar(status), gr.Timer(active=job is not None and not job.finished)

    def cancel_adding(model_id: str | None) -> None:
        if not (model_id and manager.cancel(model_id)):
            gr.Info("No download is running.")

    def models_status() -> dict:
        """The model cache's state: resident models with their size and pins, hits, misses, loads, evictions."""
        return asdict(studio.cache.snapshot())

    # ------------------------------------------------------------------------------------------ wiring

    quiet = {"api_visibility": "private", "show_progress": "hidden"}
    reshow = {"fn": show, "inputs": [shown, choice], "outputs": [summary_md, table, left_out, choice], **quiet}
    gr.on(None, **reshow)  # None: on page load
    gr.on([shown.change, gr.Timer(TABLE_EVERY_S).tick], **reshow)
    refresh.click(rescan, None, None, api_visibility="private").then(**reshow)
    table.select(from_table, shown, choice, api_visibility="private")
    choice.change(picked, choice, keep, **quiet)
    keep.input(set_keep, [choice, keep], None, api_visibility="private").then(picked, choice, keep, **quiet).then(
        **reshow)
    unload.click(unload_one, choice, None, api_visibility="private").then(**reshow)
    remove.click(lambda model_id: ask("remove", model_id), choice, [pending, confirm_row, confirm_text], **quiet)
    free_all.click(lambda: ask("free", None), None, [pending, confirm_row, confirm_text], **quiet)
    yes.click(confirmed, pending, [pending, confirm_row], api_visibility="private").then(**reshow)
    no.click(lambda: (None, gr.update(visible=False)), None, [pending, confirm_row], **quiet)
    check.click(check_source, [source, new_id, quantize], plan_md, api_visibility="private")
    add.click(start_adding, [source, new_id, quantize], [plan_md, adding, progress, poll],
              api_visibility="private").then(**reshow)
    poll.tick(watch, adding, [progress, poll], **quiet)
    cancel.click(cancel_adding, adding, None, api_visibility="private")
    gr.api(models_status, api_name="models")
