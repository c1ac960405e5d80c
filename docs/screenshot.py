"""Take the README's pictures: the overview of a 40 x 8 fleet, a PC's detail, the phone, the sign-in page.

`make screenshot` starts the server as the Procfile does and 40 simulated PCs of 8 GPUs pushing every
2 s (the real agent's loop, in threads), then shoots them in headless Chromium and says how tall
the overview is at 1920x1080 and on a 390 px phone.
"""
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

PCS = [f"node-{n:02}" for n in range(1, 41)]
GPUS = 8
USERS = ("ana", "bo", "chen", "dara", "eli", "fatima", "gus")
QUIET = "node-33"  # stops pushing: the picture shows a stale PC
HOT = ("node-07", 5)  # runs at 86-89 °C (a clogged fan, say): the picture shows an alert
DETAIL = "node-07"


class LabPC(agent.SimulatedReader):
    """A lab's PC: simulated GPUs, each job with its user; some GPUs free, one running hot."""

    def __init__(self, number, name):
        super().__init__(GPUS, seed=number)
        self.name = name
        self.idle = {i for i in range(GPUS) if (number * 3 + i) % 7 == 0}  # about one GPU in seven free

    def sample(self):
        for index in self.idle:
            self.load[index], self.drift[index] = 0.0, -1.5
        gpus = super().sample()
        for gpu in gpus:
            if gpu["index"] in self.idle:
                gpu.update(utilizationGpu=0, memoryUsed=420, processes=[])
            for process in gpu["processes"]:
                process["user"] = USERS[(process["pid"] + gpu["index"]) % len(USERS)]
        if self.name == HOT[0]:
            gpus[HOT[1]].update(temperatureGpu=86 + self.rng.randint(0, 3), utilizationGpu=97, fanSpeed=100)
        return gpus


class LabHost:
    """The PC around a LabPC's GPUs: a 64-thread workstation whose CPU, memory and network move with its jobs."""

    def __init__(self, number):
        self.number, self.started = number, time.time()

    def sample(self):
        busy = 20 + (self.number * 37 + int(time.time() - self.started)) % 60
        return {"os": "Ubuntu 24.04.1 LTS", "cpuModel": "AMD Ryzen Threadripper PRO 5975WX 32-Cores", "cpuCount": 64,
                "cpuPercent": busy, "load1": round(busy * 0.64, 1), "memoryTotal": 257_000,
                "memoryUsed": 40_000 + (self.number * 5_300) % 190_000, "swapUsed": 0,
                "disks": [{"mount": "/", "total": 1_905_000, "used": 600_000 + (self.number * 31_000) % 1_200_000},
                          {"mount": "/data", "total": 7_630_000, "used": 3_000_000 + (self.number * 97_000) % 4_500_000}],
                "netRx": busy * 1.3e6, "netTx": busy * 0.2e6, "temperatureCpu": 45 + busy // 3, "uptimeS": 86_400 * self.number}


def main(seconds=30):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    keys = {device: secrets.token_urlsafe(24) for device in PCS}
    # Alerts at the default 85 °C, fired at once rather than after 2 min.
    env = {**os.environ, "ENV_FILE": os.devnull, "DASHBOARD_PUBLIC": "1", "PORT": str(port), "HISTORY_S": "120",
           "STALE_AFTER_S": "8", "HISTORY_DB": "", "ALERT_FOR_S": "0", "DEVICE_KEYS": ",".join(f"{d}:{k}" for d, k in keys.items()),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen(["sh", "-c", "exec " + procfile_command()], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done, quiet = threading.Event(), threading.Event()
    try:
        for _ in range(100):
            try:
                requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except requests.RequestException:
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/push-sse"
        for number, device in enumerate(PCS, 1):
            stop = quiet.is_set if device == QUIET else done.is_set
            threading.Thread(target=agent.run_loop, args=(LabPC(number, device), agent.Pusher(url, keys[device]), 2),
                             kwargs={"stop": lambda stop=stop: stop() or done.is_set(), "host": LabHost(number)},
                             daemon=True).start()
        time.sleep(seconds - 10)
        quiet.set()
        time.sleep(10)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=next(p for p in CHROMIUM if os.path.exists(p)),
                                                 args=CHROMIUM_ARGS)
            wall = browser.new_page(viewport={"width": 1920, "height": 1080}, color_scheme="dark")
            wall.goto(f"http://127.0.0.1:{port}/")
            wall.wait_for_selector("#connection.live")
            wall.wait_for_timeout(2500)
            height = wall.evaluate("document.documentElement.scrollHeight")
            wall.screenshot(path=str(ROOT / "docs" / "screenshot.png"), full_page=True)
            detail = browser.new_page(viewport={"width": 1280, "height": 1000}, color_scheme="dark")
            detail.goto(f"http://127.0.0.1:{port}/?pc={DETAIL}")
            detail.wait_for_selector("#connection.live")
            detail.wait_for_timeout(1500)
            # Charts draw only while on screen: a viewport as tall as the page shows them all.
            detail.set_viewport_size({"width": 1280, "height": detail.evaluate("document.documentElement.scrollHeight")})
            detail.wait_for_timeout(1500)
            detail.screenshot(path=str(ROOT / "docs" / "detail.png"), full_page=True)
            phone = browser.new_page(viewport={"width": 390, "height": 844}, color_scheme="dark", device_scale_factor=2)
            phone.goto(f"http://127.0.0.1:{port}/")
            phone.wait_for_selector("#connection.live")
            phone.wait_for_timeout(1500)
            tall = phone.evaluate("document.documentElement.scrollHeight")
            phone.screenshot(path=str(ROOT / "docs" / "phone.png"))
            phone.goto(f"http://127.0.0.1:{port}/login")  # the sign-in page, as a phone shows it
            phone.set_viewport_size({"width": 390, "height": 640})
            phone.fill("input[name=user]", "admin")
            phone.screenshot(path=str(ROOT / "docs" / "sign-in.png"))
            browser.close()
    finally:
        done.set()
        server.terminate()
    print(f"wrote docs/screenshot.png, detail.png, phone.png and sign-in.png; the overview of {len(PCS)} x {GPUS} "
          f"GPUs is {height} px tall at 1920x1080 ({height / 1080:.1f} screens), {tall} px on a 390x844 phone "
          f"({tall / 844:.1f} screens)")


if __name__ == "__main__":
    main()
