"""The LoRA adapter picker the Image and Video tabs share: the usable adapters of lora_adapters/ and --lora-dir in
a multiselect, a weight slider per picked adapter, Refresh, and a note naming the files that cannot be used."""

from __future__ import annotations

import gradio as gr

from studio.backends.lora import MAX_WEIGHT, library
from studio.runtime import Studio

SLOTS = 6  # adapters at once, each with a weight slider


def usable(studio: Studio, refresh: bool = False) -> tuple[list[str], str]:
    """Names of the usable adapters, and a note listing the files that cannot be used and why."""
    infos = list(library(studio.settings, refresh).values())
    broken = [f"- `{i.file}` {i.error}" for i in infos if i.error]
    note = "**Adapters that cannot be used:**\n" + "\n".join(broken) if broken else ""
    if not infos:
        note = ("No adapters found: drop `.safetensors` LoRA files into `lora_adapters/` (or `--lora-dir`) and "
                "press Refresh.")
    return [i.name for i in infos if not i.error], note


def sliders(names: list[str], weights: dict[str, float]) -> list[dict]:
    """One visible weight slider per picked adapter, labelled with its name; the rest hidden."""
    return [gr.update(visible=True, label=names[i], value=weights.get(names[i], 1.0)) if i < len(names)
            else gr.update(visible=False) for i in range(SLOTS)]


class LoraPicker:
    """Built where it is created (inside a tab's layout); `wire()` adds its own events at the end of the tab."""

    def __init__(self, studio: Studio, visible: bool = True):
        self.studio = studio
        names, note = usable(studio)
        self.built = (names, note)  # what the page shows when it opens
        with gr.Accordion("LoRA adapters", open=True, visible=visible) as self.box:
            with gr.Row():
                self.picked = gr.Dropdown(names, value=[], multiselect=True, max_choices=SLOTS, scale=4,
                                          label="Adapters", info=f"Up to {SLOTS}; switching never reloads the model.")
                self.refresh = gr.Button("Refresh", scale=1)
            self.weights = [gr.Slider(-MAX_WEIGHT, MAX_WEIGHT, value=1.0, step=0.05, visible=False)
                            for _ in range(SLOTS)]
            self.note = gr.Markdown(note)
        self.shown = gr.State([])  # adapter names the sliders show, in slot order

    @property
    def inputs(self) -> list:
        """What `adapters(form)` reads from a handler's dict of inputs."""
        return [self.shown, *self.weights]

    @property
    def outputs(self) -> list:
        """What `restore(...)` updates."""
        return [self.picked, self.shown, *self.weights]

    def adapters(self, form: dict) -> dict[str, float]:
        """The picked adapters and their weights, from a handler's dict of inputs."""
        return {name: float(form[slider]) for name, slider in zip(form[self.shown], self.weights, strict=False)}

    def restore(self, adapters: dict[str, float]) -> list:
        """Pick these adapters at these weights (those no longer usable are left out, with a warning)."""
        available = usable(self.studio)[0]
        picked = [name for name in adapters if name in available][:SLOTS]
        if len(picked) < len(adapters):
            gr.Warning("Some adapters of these settings are no longer available; press Refresh.")
        return [gr.update(value=picked), picked, *sliders(picked, adapters)]

    def _on_pick(self, new: list[str], old: list[str], *values: float) -> list:
        kept = dict(zip(old, values, strict=False))
        return [new, *sliders(new, kept)]

    def _on_refresh(self, current: list[str]) -> tuple[dict, str]:
        names, note = usable(self.studio, refresh=True)
        return gr.update(choices=names, value=[name for name in current if name in names]), note

    def wire(self) -> None:
        self.picked.input(self._on_pick, [self.picked, self.shown, *self.weights], [self.shown, *self.weights],
                          api_visibility="private")
        self.refresh.click(self._on_refresh, self.picked, [self.picked, self.note], api_visibility="private")
        # No inputs: on page load only. The list the app was built with would be stale after a Refresh or a new file.
        gr.on(None, self._on_open, None, [self.picked, self.note], api_visibility="private", show_progress="hidden")

    def _on_open(self) -> tuple[dict, str | dict]:
        """The adapters found now; no change on the page when they are those it was built with."""
        if usable(self.studio, refresh=True) == self.built:
            return gr.update(), gr.update()
        return self._on_refresh([])
