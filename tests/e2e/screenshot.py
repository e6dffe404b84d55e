"""Take docs/screenshot.png, the README's picture of the studio: the Image tab with a LoRA adapter and its result,
made the same way as the browser test does it (tiny profile, Debian's Chromium).

Run from anywhere: `python tests/e2e/screenshot.py [output.png]`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the studio, and the tests' fixtures module as pytest sees it

from e2e.conftest import LORA_NAME, VIEWPORT, build_lora, chromium, serve  # noqa: E402
from e2e.test_browser import make_image  # noqa: E402


def main(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        build_lora(Path(tmp))
        with serve("--log-dir", str(Path(tmp) / "logs"), "--lora-dir", tmp) as served, chromium() as browser:
            page = browser.new_page(viewport=VIEWPORT)
            make_image(page, served.url, LORA_NAME, 0.8)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "screenshot.png")
