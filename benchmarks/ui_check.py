"""`make ui-check`: the page `genzoo serve` makes, in a real headless browser (docs/ui.md).

Trains a tiny caption-conditioned diffusion model (once; ``--retrain`` again), starts `genzoo serve` on 127.0.0.1 and a
free port, opens the page in Debian's Chromium driven by playwright (``executable_path``: playwright's own browser
download is never used), fills the prompt, clicks Generate, waits for the gallery's images and saves a screenshot;
then clears the prompt, clicks again and waits for the visible error (a second screenshot), and opens the
training-and-evaluation tab (a third). The browser may reach
only 127.0.0.1: every other request is aborted, so the page is checked to work offline. The server is stopped at the
end, whatever happened. Exit status 0 when every step passed.

    python benchmarks/ui_check.py [--minutes 1.5] [--run runs/ui-check/glide-tiny] [--out docs/images/ui/serve.png]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a large red circle in the top left"
# GLIDE's composition at 16x16 (docs/text.md), small enough to learn colours and rough shapes in about a CPU minute
RECIPE = """
recipes:
  glide-tiny:
    description: a 16x16 caption-conditioned diffusion model with classifier-free guidance, for `make ui-check`
    pipeline: {type: diffusion, condition: caption}
    data: {type: shapes, image_size: 16}
    components:
      encoder: {type: text-transformer, context: 32, width: 64, layers: 2, heads: 4}
      prior: {type: gaussian}
      decoder:
        type: diffusion-decoder
        schedule: cosine
        mean_type: x0
        cond_drop: 0.2
        denoiser: {type: unet, model_channels: 32, channel_mult: [1, 2], num_res_blocks: 1, attention_resolutions: [8],
                   context_dim: 64, emb_dim_in: 64}
      sampler: {type: ddim, steps: 25}
      guidance: {type: cfg, scale: 3.0}
    train: {batch_size: 32, lr: 2.0e-3, warmup_steps: 50, ema_decay: 0.99, grad_clip: 1.0, log_every: 10,
            checkpoint_every: 200, sample_every: 0}
"""


def log(msg: str) -> None:
    print(f"ui-check: {msg}", flush=True)


def chromium_path(given: str | None) -> str:
    for name in [given] if given else ["chromium", "chromium-browser", "google-chrome"]:
        found = shutil.which(name) if name else None
        if found:
            return found
    sys.exit(
        "ui-check: no Chromium found; install Debian's (`apt-get install -y chromium`; `make ui-check` does) "
        "or pass --chromium PATH"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(run: Path, minutes: float, retrain: bool) -> None:
    if (run / "latest").is_file() and not retrain:
        log(f"using the trained run {run} (--retrain to train it again)")
        return
    shutil.rmtree(run, ignore_errors=True)
    run.parent.mkdir(parents=True, exist_ok=True)
    recipes = run.parent / "ui-check.yaml"
    recipes.write_text(RECIPE)
    log(f"training glide-tiny for {minutes} min into {run}")
    cmd = [
        sys.executable,
        "-m",
        "genzoo",
        "train",
        "glide-tiny",
        "--recipes",
        str(recipes),
        "--out",
        str(run),
        "--minutes",
        str(minutes),
        "--device",
        "cpu",
        "--no-progress",
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)


def wait_for(url: str, server: subprocess.Popen, timeout: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if server.poll() is not None:
            sys.exit(f"ui-check: `genzoo serve` exited with status {server.returncode} before serving")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"ui-check: {url} did not answer within {timeout:.0f}s")


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGINT)  # the server's own process group: `genzoo serve` and nothing else
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def browse(url: str, slug: str, chromium: str, out: Path, timeout_s: float) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            blocked: list[str] = []

            def only_local(route) -> None:
                if route.request.url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:")):
                    route.continue_()
                else:
                    blocked.append(route.request.url)
                    route.abort()

            page.route("**/*", only_local)
            page.set_default_timeout(timeout_s * 1000)
            page.goto(url, wait_until="domcontentloaded")
            prompt = page.locator(f"#{slug}-prompt textarea")
            prompt.fill(PROMPT)
            log(f"filled the prompt: {PROMPT!r}; clicking Generate")
            t0 = time.monotonic()
            page.locator(f"#{slug}-generate").click()
            images = page.locator(f"#{slug}-gallery img")
            expect(images.first).to_be_visible()
            expect(page.locator(f"#{slug}-status")).to_contain_text("image(s) in")
            count = images.count()
            log(
                f"the gallery shows {count} image(s) after {time.monotonic() - t0:.1f}s: "
                f"{page.locator(f'#{slug}-status').inner_text().strip()}"
            )
            if count < 1:
                sys.exit("ui-check: the gallery has no image")
            out.parent.mkdir(parents=True, exist_ok=True)
            page.wait_for_timeout(500)  # the gallery's images finish decoding
            page.screenshot(path=str(out), full_page=True)
            log(f"screenshot: {out}")
            prompt.fill("")  # a bad input: a caption model without a caption
            page.locator(f"#{slug}-generate").click()
            toast = page.get_by_text("enter a prompt")
            expect(toast.first).to_be_visible()
            page.wait_for_timeout(600)  # the toast slides in
            error_shot = out.with_name(out.stem + "-error" + out.suffix)
            page.screenshot(path=str(error_shot))
            log(f"a bad input shows a visible error ({toast.first.inner_text().strip()!r}); screenshot: {error_shot}")
            close = page.locator("[data-testid='toast-close'], .toast-close")
            if close.count():
                close.first.click()
            page.get_by_role("tab", name="Training & evaluation").click()
            expect(page.get_by_text("No recorded evaluations yet").first).to_be_visible()
            expect(page.locator("canvas, svg.marks").first).to_be_visible()  # the loss curve (Vega)
            page.wait_for_timeout(500)
            files_shot = out.with_name(out.stem + "-run" + out.suffix)
            page.screenshot(path=str(files_shot), full_page=True)
            log(f"the training-and-evaluation tab shows the loss curve; screenshot: {files_shot}")
            if blocked:
                log(f"blocked {len(blocked)} request(s) that would have left 127.0.0.1, e.g. {blocked[0]}")
        finally:
            browser.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "ui-check" / "glide-tiny")
    ap.add_argument("--minutes", type=float, default=1.5, help="training budget of the tiny model")
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "ui" / "serve.png")
    ap.add_argument("--chromium", help="the browser executable (default: chromium on PATH)")
    ap.add_argument("--timeout", type=float, default=180, help="seconds to wait for the server and for each page step")
    args = ap.parse_args()
    chromium = chromium_path(args.chromium)
    try:
        import playwright  # noqa: F401
    except ImportError:
        sys.exit("ui-check: playwright is missing: pip install playwright (`make ui-check` does)")
    train(args.run, args.minutes, args.retrain)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "genzoo",
        "serve",
        str(args.run),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
    ]
    log("starting " + " ".join(cmd[2:]))
    server = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        wait_for(url, server, args.timeout)
        log(f"serving at {url}; opening it in {chromium} (headless)")
        slug = re.sub(r"[^a-z0-9]+", "_", args.run.resolve().name.lower()).strip("_")
        browse(url, slug, chromium, args.out, args.timeout)
    finally:
        stop(server)
        log("server stopped")
    log("passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
