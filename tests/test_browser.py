"""Every method's run page and a sweep page opened in headless Chromium: every image loads, every link resolves to a
file, the metrics table is there, and a screenshot is taken. Needs Debian's `chromium` and `chromium-driver`
(`apt-get install chromium chromium-driver`); skipped with that reason where they are missing."""
import os
import shutil
import sys
from pathlib import Path
from urllib.parse import unquote_to_bytes, urlparse

import pytest

from conftest import ROOT, compose, run_cli

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                       "chromium-driver)")
sys.path.insert(0, str(ROOT / "tests" / "golden"))
from cases import CASES  # noqa: E402

# One tiny run of each method (the golden cases: zoo models, seconds each).
METHODS = {"generate": "generate_ddim", "fuzzy": "fuzzy_zscore", "directions": "directions_pca", "debias": "debias",
           "cyclediff": "cyclediff", "codiff": "codiff", "ldm": "ldm_text", "hextract": "hextract"}


@pytest.fixture(scope="module")
def pages(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    from facelab.sample import run_sample

    root = tmp_path_factory.mktemp("pages")
    found = {}
    for method, case in METHODS.items():
        run_sample(compose("sample", [*CASES[case], "progress=false", "device=cpu"], root / method))
        found[method] = root / method / "index.html"
    # a real multirun through the CLI: two finished jobs and a failed one
    res = run_cli("sample", "-m", "method=ddim", f"model.pretrained={tiny_model_dir},{root / 'missing'}",
                  "num_samples=1", "sampler.steps=2,4", "progress=false", f"hydra.sweep.dir={root / 'sweep'}")
    assert "page: " in res.stdout and (root / "sweep" / "0" / "index.html").is_file(), res.stderr[-2000:]
    found["sweep"] = root / "sweep" / "index.html"
    return found


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM  # with the driver's path given, selenium-manager downloads nothing
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--allow-file-access"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def local_file(url: str) -> Path:
    """The file a file:// URL names (percent-encoded bytes decoded as the file system does)."""
    return Path(os.fsdecode(unquote_to_bytes(urlparse(url).path)))


@pytest.mark.parametrize("name", [*METHODS, "sweep"])
def test_page_in_chromium(name, pages, browser, tmp_path):
    from selenium.webdriver.common.by import By

    page = pages[name]
    browser.set_window_size(1300, 900)
    browser.get(page.as_uri())
    assert browser.execute_script("return document.readyState") == "complete"
    images = browser.execute_script(
        "return [...document.images].map(i => [i.getAttribute('src').slice(0, 80), i.complete && i.naturalWidth > 0])")
    assert images and [src for src, loaded in images if not loaded] == []
    links = browser.execute_script("return [...document.links].map(a => a.href)")
    assert links and [url for url in links if not local_file(url).exists()] == []
    table = "table.jobs" if name == "sweep" else "table.metrics"
    assert browser.find_elements(By.CSS_SELECTOR, f"{table} tbody tr")
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1300, min(height + 100, 4000))
    shot = tmp_path / f"{name}.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("FACELAB_SCREENSHOTS"):  # keep them to look at
        shutil.copy(shot, Path(os.environ["FACELAB_SCREENSHOTS"]) / shot.name)


def test_sweep_page_sorts_and_shows_failures(pages, browser):
    from selenium.webdriver.common.by import By

    browser.get(pages["sweep"].as_uri())
    table = browser.find_element(By.CSS_SELECTOR, "table.jobs")
    statuses = [td.text for td in table.find_elements(By.CSS_SELECTOR, "tbody tr td:nth-child(2)")]
    assert statuses.count("completed") == 2 and statuses.count("failed") == 2
    assert "not a zoo model" in table.text  # the failed jobs' error line

    def jobs():
        return [td.text for td in table.find_elements(By.CSS_SELECTOR, "tbody tr td:first-child")]

    header = table.find_element(By.CSS_SELECTOR, "thead th")
    header.click()
    assert jobs() == ["0", "1", "2", "3"]
    header.click()
    assert jobs() == ["3", "2", "1", "0"]
