"""The demo's serving step: serve the live version with Ray Serve, classify a few test images over HTTP, and
optionally photograph the web page (headless chromium through selenium, when both are installed)."""
from __future__ import annotations

import time
from pathlib import Path


def serve_and_classify(store: Path, test_dirs: list[Path], screenshot: Path | None = None) -> dict:
    from cl_serve.serving import launch as serve_cli
    from cl_serve.serving.client import classify_files

    port = serve_cli.free_port()
    url = f"http://127.0.0.1:{port}"
    print(f"[demo] starting Ray Serve on {url} ...")
    t0 = time.time()
    serve_cli.start(str(store), port=port, num_cpus=2, quiet=True)
    try:
        serve_cli.wait_until_healthy(url)
        images = [str(next(iter(sorted(c.iterdir())))) for d in test_dirs for c in sorted(d.iterdir())[:1]]
        answer = classify_files(images, url, top_k=1)
        print(f"[demo] server up in {time.time() - t0:.0f}s; POST /classify answered with version "
              f"{answer['model_version']}:")
        for path, p in zip(images, answer["predictions"]):
            print(f"    {Path(path).parent.name:>18s}/{Path(path).name} -> {p['label']} ({p['score']:.2f})")
        if screenshot is not None:
            save_page_screenshot(url, images[0], screenshot)
            print(f"[demo] screenshot of the page at {url}/ saved to {screenshot}")
        return {"url": url, "model_version": answer["model_version"], "predictions": answer["predictions"]}
    finally:
        serve_cli.stop()


def headless_chromium(window: str = "1280,720"):
    """A selenium driver for Debian's headless chromium; UserError saying what to install when it cannot start."""
    import shutil

    from cl_serve.base.errors import UserError

    driver_path, browser = shutil.which("chromedriver"), shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise UserError("the browser needs selenium (pip install selenium)") from None
    if not driver_path or not browser:
        raise UserError("the browser needs chromium and chromedriver (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={window}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=opts)


def save_page_screenshot(url: str, image: str, out: Path) -> None:
    """Open the page in headless chromium, classify `image` through it, save a PNG of the result."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = headless_chromium()
    try:
        driver.get(url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#versions tr[data-version]"))
        driver.find_element(By.ID, "files").send_keys(str(Path(image).resolve()))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .prediction .label"))
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
    finally:
        driver.quit()
