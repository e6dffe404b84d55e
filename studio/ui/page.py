"""What the page adds to Gradio's own: a few style rules and one script, handed to `Blocks.launch` (Gradio 6 takes
them there, not per Blocks)."""

from __future__ import annotations

CSS = """
/* The 3D viewer's own download would give the preview's mesh, maybe simplified: the files beside it have it all. */
#shape-viewer [data-testid="model3d-download-link"] {display: none;}
.clamp-notice {color: var(--color-accent); font-size: var(--text-sm); margin-top: 4px;}
"""

# Gradio sets a value typed past a slider's range to the nearest end when its number box loses focus, and says
# nothing: the script says it, under the slider, until the box is left again. It listens while the event goes down
# to the box (capture), so it sees the typed value before Gradio's own handler changes it.
SCRIPT = """
() => {
  document.addEventListener("blur", (event) => {
    const box = event.target;
    if (!(box instanceof HTMLInputElement) || !box.matches("input[type=number][aria-label^='number input for']")) {
      return;
    }
    const block = box.closest(".block");
    block?.querySelector(".clamp-notice")?.remove();
    const typed = Number(box.value), low = Number(box.min), high = Number(box.max);
    if (!block || box.value === "" || Number.isNaN(typed) || (typed >= low && typed <= high)) {
      return;
    }
    const notice = document.createElement("div");
    notice.className = "clamp-notice";
    notice.setAttribute("role", "status");
    notice.textContent = typed > high ? `${typed} is more than this allows: set to ${high}.`
                                      : `${typed} is less than this allows: set to ${low}.`;
    block.append(notice);
  }, true);
}
"""
