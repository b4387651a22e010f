"""The README's pictures of Phoenix, taken from a real `routerq demo` stack in headless Chromium, so they
are regenerated, never hand-made: the demo's traces, a failed job's trace, the demo batch's session."""

from __future__ import annotations

import os
import pty
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import ROUTERQ, wait_for
from playwright.sync_api import sync_playwright

IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"
# As this machine's notes say: without the background-networking flags Chromium keeps trying hosts
# this closed network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip


# `routerq demo` takes Redis's and Phoenix's usual ports when they are free: two demos at once would
# race for them, so the demo tests run one after the other in one pytest-xdist session.
@pytest.mark.xdist_group("routerq-demo")
def test_phoenix_screenshots_of_the_demo_stack(tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed here (CI installs it): no screenshots taken")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("REDIS_", "OPENROUTER_", "PHOENIX_", "ROUTERQ_"))
    }
    log = tmp_path / "demo.log"
    terminal, its_tty = pty.openpty()  # the demo keeps its stack up only for a person at a terminal
    with log.open("w") as out:
        demo = subprocess.Popen([ROUTERQ, "demo"], cwd=tmp_path, env=env, stdin=its_tty, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for(
            lambda: "keeps running" in log.read_text() or demo.poll() is not None,
            "the demo stack to be up",
            timeout=240,
            poll=0.5,
        )
        text = log.read_text()
        assert demo.poll() is None, text[-3000:]
        phoenix = re.search(r"Phoenix\S*: (http://127\.0\.0\.1:\d+)/projects", text)
        assert phoenix, text[-3000:]
        stack_env = dict(re.findall(r"^export (\w+)=(\S+)$", text, re.M))
        failed = subprocess.run(
            [ROUTERQ, "enqueue", "--wait", "Fail for me [[status:400]]"], env={**env, **stack_env},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert failed.returncode == 1, failed.stderr
        IMAGES.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 860})
            page.goto(f"{phoenix.group(1)}/projects")
            page.get_by_text("routerq-demo").first.click()
            page.get_by_text("Fail for me").first.wait_for(timeout=60_000)  # the failed job's trace arrived
            page.screenshot(path=IMAGES / "phoenix-traces.png")
            page.get_by_text("Fail for me").first.click()
            page.get_by_text("run/routerq.run_job").first.wait_for(timeout=30_000)  # the trace's tree drawn
            page.get_by_text("ChatCompletion").first.click()  # the LLM span: OpenRouter's error, its status
            page.get_by_role("tab", name="Attributes").first.wait_for(timeout=30_000)  # its details drawn
            page.screenshot(path=IMAGES / "phoenix-failed-job.png")
            page.keyboard.press("Escape")
            page.get_by_role("tab", name="Sessions").click()
            # the sessions table and its stats drawn: a loading skeleton comes first, and "batch_" is also
            # on the traces page behind it (a screenshot of the skeleton passed for one of the table)
            for drawn in ("session id", "Total Sessions"):
                page.get_by_text(drawn, exact=True).first.wait_for(state="visible", timeout=60_000)
            page.get_by_text("batch_").first.wait_for(state="visible", timeout=30_000)
            page.screenshot(path=IMAGES / "phoenix-sessions.png")
            browser.close()
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(timeout=60)
        except subprocess.TimeoutExpired:
            demo.kill()
        os.close(terminal)
        os.close(its_tty)
    for name in ("phoenix-traces.png", "phoenix-failed-job.png", "phoenix-sessions.png"):
        assert (IMAGES / name).stat().st_size > 10_000, name  # a picture, not an empty page
