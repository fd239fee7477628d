"""Open the explorer tutorial in JupyterLab in headless Chromium, run it, move a slider, take screenshots.

`make test-browser` runs this. It needs Debian's `chromium` (`apt-get install chromium`) and Playwright's Python
package (`pip install playwright`; no browser download: it drives /usr/bin/chromium). Exit status 0 when the
widget rendered (not a "Loading widget..." placeholder) and its outputs changed after the slider move.
"""
import argparse, os, socket, subprocess, sys, time, urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NB = "nbs/tutorials/explorer.ipynb"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            urllib.request.urlopen(url, timeout=2); return
        except Exception: time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer at {url} within {timeout}s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/browser", help="screenshot directory")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--timeout", type=float, default=240, help="seconds to wait for the notebook to run")
    a = ap.parse_args(argv)
    if not Path(a.chromium).exists():
        print(f"no Chromium at {a.chromium}: `apt-get install chromium` (Debian) or pass --chromium", file=sys.stderr); return 2
    from playwright.sync_api import sync_playwright
    out = ROOT / a.out; out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(out / ".jupyter"), JUPYTER_RUNTIME_DIR=str(out / ".runtime"))
    root = ["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []   # CI containers run as root
    lab = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", *root, "--ServerApp.token=",
                            "--ServerApp.password=", "--ServerApp.disable_check_xsrf=True", f"--ServerApp.root_dir={ROOT}",
                            "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
                           stdout=open(out / "jupyterlab.log", "w"), stderr=subprocess.STDOUT, env=env)
    ok = False
    try:
        wait_http(f"http://127.0.0.1:{port}/api")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=a.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 1500})
            page.goto(f"http://127.0.0.1:{port}/lab/tree/{NB}")
            page.wait_for_selector(".jp-Notebook", timeout=60_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle'], .jp-Toolbar-kernelStatus", timeout=60_000)
            time.sleep(2)
            page.click("div.lm-MenuBar-itemLabel:text-is('Run')")
            page.click("li.lm-Menu-item:has-text('Run All Cells')")
            # the explorer's info panel appears once the widget has rendered and run its first update
            page.wait_for_selector(".tp-kept", timeout=a.timeout * 1000)
            page.wait_for_function("document.querySelectorAll('.jp-Cell-outputArea img').length >= 7",
                                   timeout=a.timeout * 1000)   # explorer (2 images) + compare (5)
            time.sleep(1)
            try: page.get_by_role("button", name="No", exact=True).click(timeout=2000)   # JupyterLab's news prompt
            except Exception: pass
            loading = page.locator("text=Loading widget").count()
            kept0 = page.locator(".tp-kept").first.inner_text()
            img0 = page.locator(".widget-image").first.get_attribute("src")
            page.locator(".jp-OutputArea-output .widget-vbox").first.scroll_into_view_if_needed()
            page.screenshot(path=str(out / "1-rendered.png"), full_page=False)
            # move the keep-ratio slider: drag its handle to the left
            handle = page.locator(".widget-slider .noUi-handle").first
            box = handle.bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.mouse.down(); page.mouse.move(box["x"] - 60, box["y"] + box["height"] / 2, steps=8); page.mouse.up()
            page.wait_for_function(f"document.querySelector('.tp-kept') && document.querySelector('.tp-kept').innerText !== '{kept0}'",
                                   timeout=60_000)
            time.sleep(1)
            kept1 = page.locator(".tp-kept").first.inner_text()
            img1 = page.locator(".widget-image").first.get_attribute("src")
            page.screenshot(path=str(out / "2-after-slider.png"), full_page=False)
            browser.close()
        print(f"'Loading widget' placeholders: {loading}; kept tokens {kept0} -> {kept1}; image changed: {img0 != img1}")
        ok = loading == 0 and kept0 != kept1 and img0 != img1
        print("browser check:", "OK" if ok else "FAILED", f"(screenshots in {out})")
    finally:
        lab.terminate()
        try: lab.wait(10)
        except subprocess.TimeoutExpired: lab.kill()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
