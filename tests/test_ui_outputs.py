"""Files the tabs and the Gradio client / MCP endpoints hand to Gradio: one folder of the process's, pruned by age,
not a file per call left in the system's temp folder (issue 20.4)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from gradio_client import Client

from conftest import serving, tiny_studio
from studio.ui import controls


def test_results_go_to_one_folder_where_old_ones_are_deleted():
    first = controls.output_folder("image")
    root = first.parent
    assert root.name.startswith("studio-outputs-") and root.parent == Path(tempfile.gettempdir())
    old = controls.output_folder("speech")
    past = time.time() - controls.OUTPUTS_KEPT_S - 10
    os.utime(old, (past, past))
    new = controls.output_folder("3d")
    assert not old.exists() and first.exists() and new.parent == root


def test_client_calls_leave_nothing_in_the_temp_folder(tmp_path):
    studio = tiny_studio(tmp_path / "logs")
    temp = Path(tempfile.gettempdir())
    with serving(studio) as (_demo, url):
        client = Client(url, verbose=False, download_files=False)
        before = set(temp.iterdir())
        for seed in range(3):
            client.predict("hello there", model="piper-joe", api_name="/generate_speech")
            client.predict("a red cube", model="tiny-sd", steps=1, seed=seed, api_name="/generate_image")
        left = [p for p in set(temp.iterdir()) - before if not p.name.startswith("studio-outputs-")]
    assert left == [], left
