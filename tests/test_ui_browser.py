"""The web UI in a real browser: Playwright drives Debian's chromium through Generate, Edit and Model.

``playwright install`` cannot download a browser here, so the test launches the system's chromium
(``apt-get install -y chromium``; ``.ci/run`` installs it) and is skipped, with the reason, only without one.
``CYCLEDIFFUSION_SCREENSHOTS=docs/ui`` keeps the screenshots (the README's), ``CYCLEDIFFUSION_UI_MODEL=runs/demo/t2i``
points the page at a trained model instead of a tiny random one.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image
from test_ui import free_port, pixels, tiny_model

from cyclediffusion.ui import Limits, Studio, serve

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
BROWSER = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no chromium on this machine (apt-get install -y chromium)")
LOCAL_HOSTS = {"127.0.0.1", "localhost"}


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    model = os.environ.get("CYCLEDIFFUSION_UI_MODEL") or tiny_model(tmp_path_factory.mktemp("browser_model"))
    port = free_port()
    app = serve(model, port=port, limits=Limits(max_steps=20), device="cpu", dtype="float32", block=False)
    yield f"http://127.0.0.1:{port}/", model
    app.close()


def test_generate_and_edit_in_the_browser(one_thread, page_url, tmp_path):
    url, model = page_url
    shots = Path(os.environ.get("CYCLEDIFFUSION_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    studio = Studio(model, device="cpu", dtype="float32", limits=Limits(max_steps=20))
    width, height = studio.image_size
    requests: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=BROWSER, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("request", lambda request: requests.append(request.url))
        page.goto(url)

        # Generate: type a prompt, ask for two images, wait for them.
        page.locator("#gen-prompt textarea").fill("a green triangle")
        page.locator("#gen-button").click()
        images = page.locator("#gen-gallery img")
        images.nth(3).wait_for(timeout=120_000)  # four images (the page's default count)
        assert images.count() == 4
        expected = studio.generate("a green triangle", steps=20, seed=0, num_images=4).images
        first = Image.open(io.BytesIO(page.request.get(images.first.get_attribute("src")).body()))
        assert first.size == (width, height)
        assert np.abs(pixels(first) - pixels(expected[0])).max() <= 2  # the same image the API draws for seed 0
        page.screenshot(path=str(shots / "generate.png"), full_page=True)

        # Edit: upload an image, change the caption, read back the result.
        page.get_by_role("tab", name="Edit").click()
        source = studio.generate("a red circle", steps=20, seed=1).images[0]  # one of the model's own pictures
        source.save(tmp_path / "source.png")
        page.locator("#edit-image input[type=file]").set_input_files(str(tmp_path / "source.png"))
        page.locator("#edit-target textarea").fill("a blue square")
        page.locator("#edit-button").click()
        result = page.locator("#edit-result img")
        result.wait_for(timeout=120_000)
        edited = Image.open(io.BytesIO(page.request.get(result.get_attribute("src")).body()))
        want = studio.edit(source, "a red circle", "a blue square", steps=20, seed=0)
        assert edited.size == want.size
        assert np.abs(pixels(edited) - pixels(want)).max() <= 2  # what the page shows is the pipeline's edit
        page.screenshot(path=str(shots / "edit.png"), full_page=True)

        page.get_by_role("tab", name="Model").click()
        page.locator("#model-card").wait_for()
        assert "parameters" in page.locator("#model-card").inner_text()
        page.screenshot(path=str(shots / "model.png"), full_page=True)
        browser.close()

    remote = {urlparse(u).hostname for u in requests if urlparse(u).scheme in ("http", "https", "ws", "wss")}
    assert remote <= LOCAL_HOSTS, f"the page asked the outside world: {sorted(remote - LOCAL_HOSTS)}"
