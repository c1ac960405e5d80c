"""Alerts on the dashboard, in a real headless Chromium, from the real server and the real agent."""
import re
import subprocess
import sys

import pytest
from playwright.sync_api import expect

from conftest import KEYS, ROOT, gpu, multi

# Alerts at once (ALERT_FOR_S=0), and every simulated GPU (35 °C or more) is hot at 30 °C.
FAST = {"ALERT_FOR_S": "0", "ALERT_TEMP_C": "30", "PUSH_RATE_LIMIT": "1000"}
HOT = re.compile(r"^Hot: \d+ °C since \d\d:\d\d$")
RED, AMBER, GREEN = "rgb(209, 53, 43)", "rgb(199, 119, 0)", "rgb(47, 158, 102)"  # --hot, --warn, --ok


@pytest.fixture
def start_agent(tmp_path):
    """Start the real agent pushing to a server as a device; each one is stopped after the test."""
    running = []

    def start(server, *args, device="rig-1"):
        log = open(tmp_path / f"agent-{device}.log", "w")
        process = subprocess.Popen([sys.executable, str(ROOT / "agent.py"), "--url", server.url + "/push-sse",
                                    "--key", KEYS[device], *args], stdout=log, stderr=subprocess.STDOUT)
        running.append((process, log))
        return process
    yield start
    for process, log in running:
        if process.poll() is None:
            process.terminate()
            process.wait(10)
        log.close()


def open_dashboard(page, server):
    page.goto(server.url + "/?pc=rig-1")  # its detail: the tiles, the card, its alerts
    expect(page.locator("#connection")).to_have_text("live")


def card(page, device):
    return page.locator(f'section.device[data-device="{device}"]')


def tile(page, device, index):
    return card(page, device).locator(f'article.gpu[data-index="{index}"]')


def stat(page, device, index, label):
    return tile(page, device, index).locator(".stat", has=page.locator("dt", has_text=label)).locator("dd")


def recent(page, part):
    """The recent list's `part` of each line: time, .badge, .alert-kind or .alert-summary."""
    return page.locator("#alert-list li").locator(part)


def test_hot_gpus_show_on_their_tiles_the_header_and_the_list_and_a_quiet_device_goes_offline(
        start_server, start_agent, page):
    server = start_server(**FAST, STALE_AFTER_S="1", OFFLINE_AFTER_S="2")
    open_dashboard(page, server)
    expect(page.locator("#alert-count")).to_have_text("no alerts")
    expect(page.locator("#alerts")).to_be_hidden()  # nothing has fired yet: no empty list
    agent = start_agent(server, "--simulate", "2", "--interval", "0.5")

    for index in (0, 1):
        expect(tile(page, "rig-1", index).locator(".gpu-alert")).to_have_text(HOT)
    expect(tile(page, "rig-1", 0).locator(".alert-note")).to_have_css("color", RED)  # critical
    expect(tile(page, "rig-1", 0)).to_have_css("border-top-color", RED)
    expect(stat(page, "rig-1", 0, "Temp")).to_have_css("color", RED)  # hot by the server's 30 °C, not 90 °C
    expect(page.locator("#alert-count")).to_have_text("2 alerts")
    expect(page.locator("#alert-count")).to_have_css("background-color", RED)
    expect(recent(page, ".badge")).to_have_text(["firing", "firing"])
    expect(recent(page, ".alert-kind")).to_have_text(["Hot", "Hot"])
    summaries = recent(page, ".alert-summary").all_text_contents()
    assert sorted(s.split(" ")[0] for s in summaries) == ["rig-1:0", "rig-1:1"], summaries
    assert all(re.fullmatch(r"rig-1:[01] is at \d+ °C, at or above 30 °C", s) for s in summaries), summaries
    expect(recent(page, "time")).to_have_text([re.compile(r"^\d\d:\d\d$")] * 2)
    expect(card(page, "rig-1").locator(".device-alert")).to_be_hidden()

    agent.terminate()  # the PC goes quiet: offline 2 s after its last push
    offline = card(page, "rig-1").locator(".device-alert")
    expect(offline).to_have_text(re.compile(r"^rig-1 is offline: no push since \d\d:\d\d"), timeout=6000)
    expect(offline.locator(".alert-note")).to_have_css("color", RED)
    expect(card(page, "rig-1")).to_have_css("border-top-color", RED)
    expect(page.locator("#alert-count")).to_have_text("3 alerts")
    expect(recent(page, ".alert-kind")).to_have_text(["Offline", "Hot", "Hot"])  # newest first
    expect(tile(page, "rig-1", 0).locator(".gpu-alert")).to_have_text(HOT)  # still hot when last heard
    assert page.console_errors == []


def test_alerts_come_from_the_api_on_opening_and_after_a_reconnect_and_a_finished_job_is_good_news(
        start_server, page):
    server = start_server(**FAST, ALERT_JOB_MIN_S="1")
    server.push(multi(gpu(0, temperatureGpu=91), gpu(1, temperatureGpu=20)))
    open_dashboard(page, server)  # its event went out before the page listened: it comes from api/alerts
    expect(tile(page, "rig-1", 0).locator(".gpu-alert")).to_have_text(re.compile(r"^Hot: 91 °C since \d\d:\d\d$"))
    expect(tile(page, "rig-1", 1).locator(".gpu-alert")).to_be_hidden()
    expect(page.locator("#alert-count")).to_have_text("1 alert")

    # It resolves while the page is cut off (a restart: the event ids start again, nothing is replayed).
    page.route("**/gpu/stream*", lambda route: route.abort())
    server.restart()
    expect(page.locator("#connection")).to_have_text("reconnecting…")
    server.wait_past_last_push(2)  # busy from the first push to this one for ALERT_JOB_MIN_S (1 s) at least
    server.push(multi(gpu(0, temperatureGpu=25), gpu(1, temperatureGpu=20)))
    page.unroute("**/gpu/stream*")
    expect(page.locator("#connection")).to_have_text("live", timeout=10000)
    expect(tile(page, "rig-1", 0).locator(".gpu-alert")).to_be_hidden(timeout=10000)  # 5 s spread after a reconnect
    expect(tile(page, "rig-1", 0)).not_to_have_css("border-top-color", RED)
    expect(stat(page, "rig-1", 0, "Temp")).to_have_text("25 °C")
    expect(stat(page, "rig-1", 0, "Temp")).not_to_have_css("color", RED)
    expect(page.locator("#alert-count")).to_have_text("no alerts")
    expect(recent(page, ".badge")).to_have_text(["resolved"])
    expect(recent(page, ".alert-summary")).to_have_text(["rig-1:0 is back to 25 °C, under 30 °C"])

    # GPU 0, busy (80 %) since the first push, is now idle: its job is done, news rather than a problem.
    server.push_as_new_history_point(multi(gpu(0, temperatureGpu=25, utilizationGpu=2), gpu(1, temperatureGpu=20)))
    expect(recent(page, ".badge")).to_have_text(["job done", "resolved"])
    expect(recent(page, ".badge").first).to_have_css("color", GREEN)
    # The job that ran is named: the conftest GPU lists one "python" process (no user).
    expect(recent(page, ".alert-summary").first).to_have_text(re.compile(r"^python on rig-1:0 finished after \d+ s, peak "))
    expect(page.locator("#alert-count")).to_have_text("no alerts")
    expect(tile(page, "rig-1", 0).locator(".gpu-alert")).to_be_hidden()


def test_an_answer_asked_before_a_resolution_does_not_bring_the_alert_back(start_server, page):
    server = start_server(**FAST)
    server.push(multi(gpu(0, temperatureGpu=91)))
    held = []  # the page's api/alerts request, answered now (GpuHot firing) but handed over later
    page.route("**/api/alerts", lambda route: held.append((route, route.fetch())))
    open_dashboard(page, server)
    while not held:
        page.wait_for_timeout(20)
    server.push(multi(gpu(0, temperatureGpu=25)))  # the resolution reaches the page as an event
    expect(recent(page, ".badge")).to_have_text(["resolved"])
    route, answer = held[0]
    route.fulfill(response=answer)
    expect(page.locator("#alert-count")).to_be_visible()  # shown once an answer is in
    expect(page.locator("#alert-count")).to_have_text("no alerts")
    expect(recent(page, ".badge")).to_have_text(["resolved"])
    expect(tile(page, "rig-1", 0).locator(".gpu-alert")).to_be_hidden()
