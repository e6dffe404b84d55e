"""Image editing in a real browser (Debian's Chromium through Playwright), on the tiny profile: a mask painted in the
editor is inpainted and everything outside it stays the input's pixels; a gallery image goes on to be edited
(image to image), upscaled, made into a 3D shape and set as an adapter's preview; a dropped AUTOMATIC1111 PNG
restores its settings."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image, ImageFilter
from PIL.PngImagePlugin import PngInfo

from e2e.conftest import CHROMIUM, LORA_NAME
from studio.backends.image_inputs import feather_reach

if not CHROMIUM.exists():
    pytest.skip(f"the browser tests need Debian's Chromium at {CHROMIUM} (apt-get install chromium)",
                allow_module_level=True)

from playwright.sync_api import Locator, Page, expect  # noqa: E402

from e2e.test_browser import PROMPT, choose, drawn, fill, last_row, open_studio, open_tab, set_slider  # noqa: E402

MODEL = "tiny-sd-turbo"  # the tab's default


def picture(path) -> np.ndarray:
    x, y = np.meshgrid(np.linspace(0, 1, 64), np.linspace(0, 1, 64))
    pixels = (np.stack([x, y, 1 - x * y], -1) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels.astype(np.int16)


def painted_white(page: Page, canvas: Locator, seconds: float = 30) -> bool:
    """Whether white (the brush) shows at the middle of the canvas within `seconds`."""
    for _ in range(int(seconds * 2)):
        shot = np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB"), dtype=np.int16)
        middle = shot[shot.shape[0] // 2 - 4:shot.shape[0] // 2 + 4, shot.shape[1] // 2 - 4:shot.shape[1] // 2 + 4]
        if (middle.min(axis=2) > 245).mean() > 0.5:
            return True
        page.wait_for_timeout(500)
    return False


def gallery_image(page: Page, panel: Locator, caption: str) -> Image.Image:
    """The gallery image with this caption (its first words), as the browser got it."""
    image = panel.get_by_role("img", name=caption).first
    expect(image).to_be_visible()
    response = page.request.get(image.get_attribute("src"))
    return Image.open(io.BytesIO(response.body()))


def test_a_mask_painted_in_the_editor_is_inpainted_and_the_rest_kept(server, page, tmp_path, monkeypatch):
    original = picture(tmp_path / "input.png")
    masks = []
    with server.studio.cache.use(MODEL) as lease:  # keep what the tab sent, to check against it
        model = lease.model
        draw = model.draw
        monkeypatch.setattr(model, "draw", lambda plan, *a: (masks.append(plan.mask), draw(plan, *a))[1])
    panel = open_studio(page, server.url, "Image")
    panel.get_by_label("Inpaint", exact=True).check()
    editor = page.locator("#image-editor")
    expect(editor).to_contain_text("paint the area")  # the mode's update has arrived: it would reset an upload
    canvas = editor.locator("canvas").first
    expect(canvas).to_be_visible()  # the editor's drawing surface is up: before it is, an upload is dropped
    editor.locator("input[type=file]").set_input_files(str(tmp_path / "input.png"))
    assert drawn(page, canvas), "the editor does not show the uploaded image"
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x - 20, y)
    page.mouse.down()
    page.mouse.move(x + 20, y, steps=8)  # one short white stroke across the middle
    page.mouse.up()
    assert painted_white(page, canvas), "the stroke does not show on the canvas"
    panel.get_by_role("textbox", name=PROMPT).fill("a red fox")
    fill(panel.get_by_role("textbox", name="Seed"), 4)
    panel.get_by_role("button", name="Generate", exact=True).click()
    result = np.asarray(gallery_image(page, panel, "seed 4").convert("RGB"), dtype=np.int16)
    expect(panel.get_by_text('"mode": "inpaint"')).to_be_visible()  # the selected image's settings
    row = last_row(server, "image")
    assert (row["client"], row["status"], row["seed"]) == ("ui", "ok", 4)
    mask = masks[-1]
    painted = np.asarray(mask) > 0
    assert 0 < painted.mean() < 0.7, "the stroke should cover part of the image"
    reach = feather_reach(4)
    near = np.asarray(mask.filter(ImageFilter.MaxFilter(2 * reach + 1))) > 0
    assert (~near).any() and np.array_equal(result[~near], original[~near]), "pixels outside the mask changed"
    assert np.abs(result[painted] - original[painted]).mean() > 5, "the painted area was not redrawn"


def test_a_gallery_image_is_edited_upscaled_and_made_into_3d(server, page):
    panel = open_studio(page, server.url, "Image")
    panel.get_by_role("textbox", name=PROMPT).fill("a wooden chair")
    fill(panel.get_by_role("textbox", name="Seed"), 11)
    panel.get_by_role("button", name="Generate", exact=True).click()
    panel.get_by_role("img", name="seed 11").first.click()  # select it
    panel.get_by_text("Edit an adapter's card").click()  # one click makes it the adapter's preview
    choose(page, panel, "Card to edit", LORA_NAME)
    panel.get_by_role("button", name="Use the selected gallery image as its preview").click()
    expect(panel.locator(f'#lora-cards [data-lora="{LORA_NAME}"] img[src^="data:image/png"]')).to_be_visible()
    assert server.studio.settings.lora_dir.joinpath(f"{LORA_NAME}.preview.png").is_file()
    panel.get_by_role("button", name="Edit", exact=True).click()
    expect(panel.get_by_label("Image to image", exact=True)).to_be_checked()
    set_slider(panel, "Steps", 2)
    panel.get_by_role("button", name="Generate", exact=True).click()
    edited = gallery_image(page, panel, re.compile(r"seed 11 · 2 steps .*Image to image"))
    assert edited.size == (64, 64) and last_row(server, "image")["status"] == "ok"
    panel.get_by_role("img", name=re.compile(r"seed 11 · 2 steps .*Image to image")).first.click()
    panel.get_by_role("button", name="Upscale", exact=True).click()
    expect(panel.get_by_label("Upscale", exact=True)).to_be_checked()
    panel.get_by_role("button", name="Generate", exact=True).click()
    upscaled = gallery_image(page, panel, re.compile(r"seed 11 · 2 steps .*Upscale"))
    assert upscaled.size == (128, 128)
    assert last_row(server, "image")["output_pixels"] == 128 * 128
    panel.get_by_role("img", name=re.compile(r"seed 11 · 2 steps .*Upscale")).first.click()
    panel.get_by_role("button", name="Make 3D", exact=True).click()
    shape = page.get_by_role("tabpanel")
    expect(page.get_by_role("tab", name="3D", exact=True)).to_have_attribute("aria-selected", "true")
    expect(shape.locator("#shape-image img")).to_be_visible()  # the image arrived
    # The picker shows the model's label (with its size): the image picked the image-to-3D model.
    expect(shape.get_by_role("combobox", name="Model")).to_have_value(re.compile(r"^Tiny Shap-E image to 3D"))
    set_slider(shape, "Steps", 2)
    shape.get_by_label("Render the turntable").uncheck()
    shape.get_by_role("button", name="Generate", exact=True).click()
    expect(shape.get_by_text("faces")).to_be_visible()
    row = last_row(server, "3d")
    assert (row["model"], row["status"]) == ("tiny-shap-e-img2img", "ok") and row["faces"] > 0


def test_dropping_an_automatic1111_png_restores_its_settings(server, page, tmp_path):
    info = PngInfo()
    info.add_text("parameters", "a lighthouse at dusk\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a, "
                                "CFG scale: 6, Seed: 1234, Size: 64x64, Model: v1-5-pruned-emaonly")
    Image.new("RGB", (64, 64), "navy").save(tmp_path / "a1111.png", pnginfo=info)
    panel = open_studio(page, server.url, "Image")
    choose(page, panel, "Model", "tiny-sd")
    expect(panel.get_by_label("number input for Steps", exact=True)).to_have_attribute("max", "50")
    panel.locator("input[type=file]").last.set_input_files(str(tmp_path / "a1111.png"))
    expect(panel.get_by_role("textbox", name=PROMPT)).to_have_value("a lighthouse at dusk")
    expect(panel.get_by_role("textbox", name="Negative prompt")).to_have_value("blurry")
    expect(panel.get_by_role("textbox", name="Seed")).to_have_value("1234")
    expect(panel.get_by_label("number input for Steps", exact=True)).to_have_value("3")
    expect(panel.get_by_label("number input for Guidance scale", exact=True)).to_have_value("6")
    expect(panel.get_by_role("combobox", name="Sampler")).to_have_value("Euler a")
    open_tab(page, "Image")
