"""Take docs/screenshot.png: the dashboard with a simulated fleet, in headless Chromium."""
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import agent  # noqa: E402
from conftest import CHROMIUM, CHROMIUM_ARGS, procfile_command  # noqa: E402

FLEET = {"render-box": 4, "workstation": 2, "lab-rig": 1}
HOT = "workstation"  # its last GPU runs hot, so the picture shows an alert
COOL_SPELL_S = (12, 18)  # seconds after the start when it cools down for a while: a resolved alert too


class RunningHot(agent.SimulatedReader):
    """Simulated GPUs, the last of which is busy and runs at 86-89 °C (a clogged fan, say), but for a cool spell."""

    def __init__(self, count):
        super().__init__(count)
        self.started = time.monotonic()

    def sample(self):
        self.load[-1] = max(self.load[-1], 88)
        gpus = super().sample()
        cool = COOL_SPELL_S[0] <= time.monotonic() - self.started < COOL_SPELL_S[1]
        gpus[-1].update(temperatureGpu=(76 if cool else 86) + self.rng.randint(0, 3), fanSpeed=100)
        return gpus


def main(seconds=40):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    keys = {device: secrets.token_urlsafe(24) for device in FLEET}
    # Alerts at the default 85 °C, fired and resolved at once rather than after 2 min.
    env = {**os.environ, "ENV_FILE": os.devnull, "DASHBOARD_PUBLIC": "1", "PORT": str(port), "HISTORY_S": "120",
           "STALE_AFTER_S": "8", "HISTORY_DB": "", "ALERT_FOR_S": "0", "DEVICE_KEYS": ",".join(f"{d}:{k}" for d, k in keys.items()),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen(["sh", "-c", "exec " + procfile_command()], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    agents, done = [], threading.Event()
    try:
        for _ in range(100):
            try:
                requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except requests.RequestException:
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/push-sse"
        for device, gpus in FLEET.items():
            if device == HOT:  # the real agent's loop, in this process, with the hot GPU
                threading.Thread(target=agent.run_loop, args=(RunningHot(gpus), agent.Pusher(url, keys[device]), 1),
                                 kwargs={"stop": done.is_set}, daemon=True).start()
                continue
            agents.append(subprocess.Popen([sys.executable, str(ROOT / "agent.py"), "--url", url,
                                            "--simulate", str(gpus), "--interval", "1"],
                                           env={**os.environ, "DEVICE_KEY": keys[device]},
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(seconds - 12)
        agents[-1].terminate()  # one PC goes quiet, so the picture shows a stale device too
        time.sleep(12)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=next(p for p in CHROMIUM if os.path.exists(p)),
                                                 args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000}, color_scheme="dark")
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#connection.live")
            page.wait_for_timeout(1500)
            # Charts draw only while on screen: a viewport as tall as the page shows them all.
            page.set_viewport_size({"width": 1280, "height": page.evaluate("document.documentElement.scrollHeight")})
            page.wait_for_timeout(1500)
            page.screenshot(path=str(ROOT / "docs" / "screenshot.png"), full_page=True)
            # The sign-in page as a phone shows it, in the dark.
            phone = browser.new_page(viewport={"width": 390, "height": 640}, color_scheme="dark", device_scale_factor=2)
            phone.goto(f"http://127.0.0.1:{port}/login")
            phone.fill("input[name=user]", "admin")
            phone.screenshot(path=str(ROOT / "docs" / "sign-in.png"))
            browser.close()
    finally:
        done.set()
        for process in agents + [server]:
            process.terminate()
    print("wrote docs/screenshot.png and docs/sign-in.png")


if __name__ == "__main__":
    main()
