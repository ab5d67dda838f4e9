"""``astrotrunc demo`` at its smallest size: every output file, and the report in a browser.

The demo runs once per module (``demo_outputs``); the browser test opens its ``report.html`` in
headless Chromium through Playwright and is skipped where either is not installed.
"""

import os
import shutil
from pathlib import Path

import pytest
from astropy.io import fits
from astropy.table import QTable

from astrotrunc import demo
from astrotrunc.inference import InferenceSettings

pytestmark = pytest.mark.usefixtures("one_thread")

#: The smallest inference the demo can run (seconds, not minutes).
TINY = InferenceSettings(n_rounds=1, n_simulations=512, max_epochs=2, n_samples=2000,
                         chunk_size=128, hidden=16)


@pytest.fixture(scope="module")
def demo_outputs(tmp_path_factory):
    """``{name: path}`` of one demo run at the TINY size (shared by the tests below)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return demo.run_demo(tmp_path_factory.mktemp("demo") / "out", settings=TINY,
                             progress=False, command="test")
    finally:
        torch.set_num_threads(n)


def test_demo_writes_every_file(demo_outputs):
    paths = demo_outputs
    assert set(paths) == set(demo.DEMO_FILES)
    with fits.open(paths["observation.fits"]) as hdul:
        assert hdul[0].header["CTYPE1"].startswith("GLON") and hdul[0].data.shape == (128, 128)
    summary = QTable.read(paths["posterior_summary.ecsv"])
    assert len(summary) == 9 and summary.colnames[0] == "posterior"
    for name in ("detections.png", "completeness.png", "truncated_samples.png",
                 "posterior_corner.png"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = paths["report.html"].read_text()
    assert page.count("data:image/png;base64,") == 4 and "test" in page
    with pytest.raises(OSError, match="exist already"):  # no clobber without overwrite
        demo.run_demo(paths["report.html"].parent, settings=TINY, progress=False)


@pytest.fixture(scope="module")
def chromium():
    """``(playwright.sync_api, executable)``: a Chromium-family browser for Playwright, or a skip.

    The browser: $ASTROTRUNC_CHROMIUM, else ``chromium`` / ``google-chrome`` on the PATH, else
    the one ``playwright install chromium`` downloads.
    """
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="Playwright is not installed (pip install playwright)")
    given = os.environ.get("ASTROTRUNC_CHROMIUM")
    candidates = [given] if given else [
        shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome",
                                  "google-chrome-stable")]
    with sync_api.sync_playwright() as p:
        candidates.append(p.chromium.executable_path)
    for exe in candidates:
        if exe and Path(exe).exists():
            return sync_api, exe
    pytest.skip("no Chromium browser installed (set ASTROTRUNC_CHROMIUM to one)")


def test_report_renders_in_a_browser(chromium, demo_outputs):
    """report.html loads in headless Chromium, every image decodes, no console errors."""
    sync_api, executable = chromium
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("requestfailed", lambda r: errors.append(f"failed to load {r.url}"))
            response = page.goto(demo_outputs["report.html"].as_uri(), wait_until="load")
            assert response is None or response.ok
            images = page.evaluate("""() => Array.from(document.images).map(
                img => ({alt: img.alt, complete: img.complete, width: img.naturalWidth}))""")
            layout = page.evaluate("""() => ({
                title: document.title,
                headings: Array.from(document.querySelectorAll('h2')).map(h => h.textContent),
                overflow: document.documentElement.scrollWidth - window.innerWidth})""")
        finally:
            browser.close()
    assert [i["alt"] for i in images] == ["detections.png", "completeness.png",
                                          "truncated_samples.png", "posterior_corner.png"]
    assert all(i["complete"] and i["width"] > 0 for i in images), images
    assert errors == []
    assert layout["title"] == "astrotrunc demo report" and len(layout["headings"]) >= 4
    assert layout["overflow"] <= 0, "the page is wider than a 1280-pixel window"
