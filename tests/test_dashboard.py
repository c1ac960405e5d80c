"""The dashboard in a real headless Chromium against the real server."""
import os
import re
import signal
import time
from datetime import datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from playwright.sync_api import expect

import agent
from conftest import PRIVATE, Stream, gpu, multi, wait_for

# What a user sees on a chart's canvas, kept where a test can read it: the text each canvas drew
# since it was last cleared (its axis labels), and every CSP violation the page caused.
WATCH_PAGE = """
(() => {
  const proto = CanvasRenderingContext2D.prototype;
  const clearRect = proto.clearRect, fillText = proto.fillText;
  proto.clearRect = function (x, y, w, h) {
    if (x <= 0 && y <= 0 && w >= this.canvas.width && h >= this.canvas.height) this.canvas.drawnText = [];
    return clearRect.apply(this, arguments);
  };
  proto.fillText = function (text) {
    (this.canvas.drawnText ||= []).push(String(text));
    return fillText.apply(this, arguments);
  };
  window.cspViolations = [];
  document.addEventListener("securitypolicyviolation",
    event => window.cspViolations.push(`${event.violatedDirective} ${event.blockedURI}`));
})();
"""
CLOCK = re.compile(r"^\d\d:\d\d$")
CLOCK_S = re.compile(r"^\d\d:\d\d:\d\d$")
DATE = re.compile(r"^\d{1,2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)$")
AT_REST = ["", "util %", "memory %", "°C", "power %"]  # the legend with the pointer off the chart


@pytest.fixture
def page(page):
    """The conftest page, watched from its first script on (see WATCH_PAGE)."""
    page.add_init_script(WATCH_PAGE)
    return page


def open_dashboard(page, server, path="/?pc=rig-1"):
    """Open a page of the dashboard: by default rig-1's detail, where its charts are."""
    page.goto(server.url + path)
    expect(page.locator("#connection")).to_have_text("live")


def tile(page, device, index):
    return page.locator(f'section.device[data-device="{device}"] article.gpu[data-index="{index}"]')


def stat(page, device, index, label):
    return tile(page, device, index).locator(".stat", has=page.locator("dt", has_text=label)).locator("dd")


def legend(page, device, index):
    return tile(page, device, index).locator(".legend span")


def hover(page, device, index, fraction):
    """Point at `fraction` of the chart's plot width, half-way up."""
    box = tile(page, device, index).locator(".u-over").bounding_box()
    page.mouse.move(box["x"] + box["width"] * fraction, box["y"] + box["height"] / 2)


def points_under_pointer(page, device, index):
    """Sweep the pointer across the chart; return [(time, util text)] for each point the legend showed."""
    box = tile(page, device, index).locator(".u-over").bounding_box()
    spans, seen = legend(page, device, index), []
    for x in range(int(box["x"]) + 1, int(box["x"] + box["width"]), 3):
        page.mouse.move(x, box["y"] + box["height"] / 2)
        when, util = spans.evaluate_all("spans => spans.slice(0, 2).map(s => s.textContent)")
        if when and (when, util) not in seen:
            seen.append((when, util))
    page.mouse.move(0, 0)
    return seen


def axis_labels(page, device, index, predicate, timeout=5):
    """Return the text drawn on the chart's canvas once `predicate(labels)` holds; fail at the timeout."""
    canvas = tile(page, device, index).locator("canvas")
    got = []

    def check():
        got[:] = canvas.evaluate("c => c.drawnText || []")
        return predicate(got)
    try:
        wait_for(check, timeout=timeout, interval=0.1)
    except AssertionError:
        raise AssertionError(f"the chart's labels are {got}") from None
    return list(got)


def line_runs(page, device, index):
    """Return [(first, last)] plot columns of each unbroken stretch of coloured (series) pixels."""
    return tile(page, device, index).locator(".uplot").evaluate("""root => {
      const canvas = root.querySelector("canvas"), over = root.querySelector(".u-over");
      const ratio = canvas.width / canvas.getBoundingClientRect().width;
      const c = canvas.getBoundingClientRect(), o = over.getBoundingClientRect();
      const x0 = Math.round((o.left - c.left) * ratio), y0 = Math.round((o.top - c.top) * ratio);
      const w = Math.round(o.width * ratio), h = Math.round(o.height * ratio);
      const px = canvas.getContext("2d").getImageData(x0, y0, w, h).data;
      const runs = [];
      for (let x = 0; x < w; x++) {
        let coloured = false;
        for (let y = 0; y < h && !coloured; y++) {
          const i = 4 * (y * w + x);
          const [r, g, b, a] = [px[i], px[i + 1], px[i + 2], px[i + 3]];
          coloured = a > 100 && Math.max(r, g, b) - Math.min(r, g, b) > 80; // grid lines are grey
        }
        if (!coloured) continue;
        if (runs.length && runs[runs.length - 1][1] >= x - 2) runs[runs.length - 1][1] = x;
        else runs.push([x, x]);
      }
      return runs;
    }""")


def history_requests(page):
    """Record the page's api/history requests as dicts of their query parameters."""
    seen = []
    page.on("request", lambda r: seen.append({k: v[0] for k, v in parse_qs(urlsplit(r.url).query).items()})
            if urlsplit(r.url).path.endswith("/api/history") else None)
    return seen


def asked_for(page, asked, count, timeout=5):
    """Wait until the page has made `count` api/history requests, and check it made no more.

    Playwright's sync API hands the test a page's events only while the test is inside one of its
    calls, so the wait is one: a request made after the last call would never reach `asked`."""
    deadline = time.monotonic() + timeout
    while len(asked) < count and time.monotonic() < deadline:
        page.wait_for_timeout(20)
    assert len(asked) == count, asked


def written(server, points, device="rig-1", auth=None):
    """Wait until api/history holds `points` points of the device's GPU 0 (history is written in batches)."""
    def count():
        answer = requests.get(server.url + "/api/history", params={"device": device}, auth=auth, timeout=5).json()
        return answer["gpus"] and len(answer["gpus"][0]["t"]) >= points
    wait_for(count, timeout=5, interval=0.1)


def recent_clock(label, minutes):
    """Whether `label` (HH:MM) is a clock time of the last `minutes` minutes, here and now."""
    now = datetime.now()
    return any((now - timedelta(minutes=m)).strftime("%H:%M") == label for m in range(-1, minutes + 1))


def test_fleet_appears_with_readable_values_and_totals(server, page):
    server.push(multi(gpu(0), gpu(1, powerDraw=None, utilizationGpu=5, temperatureGpu=91)), device="rig-1")
    server.push({"name": "NVIDIA RTX 3080", "vendor": "NVIDIA", "temperatureGpu": 65, "utilizationGpu": 80},
                device="rig-2")
    open_dashboard(page, server, "/")
    expect(page.locator("#pcs .pc-name")).to_have_text(["rig-1", "rig-2"])
    for name, value in [("online", "2"), ("gpus", "3"), ("busy", "2"), ("vram", "12.0 / 20.0 GiB"),
                        ("power", "221 W"), ("offline", "0")]:
        expect(page.locator(f"#total-{name}")).to_have_text(value)
    open_dashboard(page, server)
    expect(page.locator("section.device h2")).to_have_text(["rig-1"])  # the detail: that PC alone
    expect(tile(page, "rig-1", 0).locator(".gpu-id")).to_have_text("rig-1:0")
    expect(tile(page, "rig-1", 0).locator(".gpu-name")).to_have_text("NVIDIA GeForce RTX 3080")
    expect(stat(page, "rig-1", 0, "Util")).to_have_text("80 %")
    expect(stat(page, "rig-1", 0, "Memory")).to_have_text("6.0 / 10.0 GiB")
    expect(stat(page, "rig-1", 0, "Temp")).to_have_text("65 °C")
    expect(stat(page, "rig-1", 0, "Power")).to_have_text("221 / 320 W")
    expect(stat(page, "rig-1", 0, "Fan")).to_have_text("55 %")
    expect(stat(page, "rig-1", 0, "Clocks")).to_have_text("core 1,905 · memory 9,501 MHz")
    inside = page.evaluate("""[...document.querySelectorAll('article.gpu')].every(tile => {
        const edge = tile.getBoundingClientRect().right;
        return [...tile.querySelectorAll('.stat dd')].every(dd => dd.getBoundingClientRect().right <= edge); })""")
    assert inside, "a value runs out of its tile"
    expect(tile(page, "rig-1", 0).locator(".processes li")).to_have_text(["4242 python2.0 GiB"])
    expect(stat(page, "rig-1", 1, "Power")).to_have_text("–")  # not reported: a dash, not 0
    expect(stat(page, "rig-1", 1, "Temp")).to_have_class("level-hot")
    open_dashboard(page, server, "/?pc=rig-2")
    expect(stat(page, "rig-2", 0, "Memory")).to_have_text("–")
    expect(stat(page, "rig-2", 0, "Fan")).to_be_hidden()  # not sent at all: no row
    assert page.console_errors == []


def test_other_vendors_gpus_show_their_vendor_shared_memory_and_who_holds_them(server, page):
    # What the AMD reader sends for an APU (memory is the system's) beside a discrete Radeon,
    # and the Apple reader's M1 Pro with nulls wherever macOS gives nothing without root.
    apu = {"index": 0, "name": "AMD Radeon 780M", "vendor": "AMD", "utilizationGpu": 3, "memoryTotal": 16384,
           "memoryUsed": 900, "memoryShared": True, "temperatureGpu": 41, "powerDraw": None, "fanSpeed": None,
           "processes": [{"pid": 2201, "name": "blender", "user": "ana", "memoryUsed": 512}]}
    radeon = {"index": 1, "name": "Radeon RX 580 Series", "vendor": "AMD", "utilizationGpu": 100,
              "memoryTotal": 8192, "memoryUsed": 2048, "clockCore": 1366, "clockMemory": None}
    server.push(multi(apu, radeon), device="rig-3")
    server.push(multi({"index": 0, "name": "Apple M1 Pro", "vendor": "Apple", "utilizationGpu": 12,
                       "memoryTotal": 32768, "memoryUsed": 1200, "memoryShared": True, "temperatureGpu": None,
                       "powerDraw": None, "clockCore": None, "processes": []}), device="rig-4")
    open_dashboard(page, server, "/?pc=rig-3")
    expect(tile(page, "rig-3", 0).locator(".gpu-vendor")).to_have_text("")  # "AMD Radeon" says it already
    expect(tile(page, "rig-3", 1).locator(".gpu-vendor")).to_have_text("AMD")
    expect(stat(page, "rig-3", 0, "Memory")).to_have_text("0.9 / 16.0 GiB shared")
    expect(tile(page, "rig-3", 0).locator(".processes li")).to_have_text(["2201 blenderana0.5 GiB"])
    expect(tile(page, "rig-3", 0).locator(".processes .puser")).to_have_text("ana")
    expect(stat(page, "rig-3", 1, "Clocks")).to_have_text("core 1,366 · memory – MHz")
    open_dashboard(page, server, "/?pc=rig-4")
    expect(stat(page, "rig-4", 0, "Temp")).to_have_text("–")
    expect(stat(page, "rig-4", 0, "Power")).to_have_text("–")
    expect(stat(page, "rig-4", 0, "Memory")).to_have_text("1.2 / 32.0 GiB shared")
    # The system memory of an APU or a Mac is not the fleet's VRAM: only the Radeon's counts.
    open_dashboard(page, server, "/")
    expect(page.locator("#total-vram")).to_have_text("2.0 / 8.0 GiB")
    expect(page.locator("#total-gpus")).to_have_text("3")
    assert page.console_errors == []


def test_values_and_charts_update_live_and_the_dom_does_not_grow(start_server, page):
    server = start_server(PUSH_RATE_LIMIT="1000", HISTORY_S="30")  # 30 s across the chart: points apart
    for util in (10, 20, 30):
        server.push_as_new_history_point(multi(gpu(0, utilizationGpu=util)))
    written(server, 3)  # history is written in batches: the page's one load must find all three
    open_dashboard(page, server)
    # The snapshot holds only the latest state: the two points before it come from api/history.
    expect(tile(page, "rig-1", 0).locator(".legend .util")).to_have_text("util %")
    wait_for(lambda: [u for _, u in points_under_pointer(page, "rig-1", 0)] == ["util 10 %", "util 20 %", "util 30 %"],
             timeout=5, interval=0.2)
    nodes = page.evaluate("document.getElementsByTagName('*').length")
    began = time.time()
    server.push_as_new_history_point(multi(gpu(0, utilizationGpu=40)))  # a 4th point, then 29 pushes into it
    for util in range(42, 100, 2):
        server.push(multi(gpu(0, utilizationGpu=util)))
    seconds = int(server.answered_at) - int(began) + 1  # the burst's clock seconds: one point each at most
    expect(stat(page, "rig-1", 0, "Util")).to_have_text("98 %")
    server.push_as_new_history_point(multi(gpu(0, utilizationGpu=7)))
    expect(stat(page, "rig-1", 0, "Util")).to_have_text("7 %")
    # Extended live, one point a second as the server keeps them, without loading again.
    seen = wait_for(lambda: (p := points_under_pointer(page, "rig-1", 0)) and p[-1][1] == "util 7 %" and p,
                    timeout=3, interval=0.2)
    utils = [u for _, u in seen]
    assert utils[:3] == ["util 10 %", "util 20 %", "util 30 %"] and utils[-2:] == ["util 98 %", "util 7 %"], utils
    assert 1 <= len(utils) - 4 <= seconds, utils  # the burst's pushes went into its points, not one each
    assert page.evaluate("document.getElementsByTagName('*').length") == nodes


def test_the_live_chart_loads_history_from_the_api_with_a_time_and_a_value_axis(server, page):
    asked = history_requests(page)
    for util in (10, 20, 30):
        server.push_as_new_history_point(multi(gpu(0, utilizationGpu=util)))
    written(server, 3)
    open_dashboard(page, server)
    expect(page.locator('#ranges button[aria-pressed="true"]')).to_have_text("10 min")
    asked_for(page, asked, 1)
    assert asked[0] == {"device": "rig-1"}  # the live range: the server's HISTORY_S up to now
    labels = axis_labels(page, "rig-1", 0, lambda got: {"0", "50", "100"} <= set(got)
                         and len([t for t in got if CLOCK.match(t)]) >= 2)
    times = [t for t in labels if not t.isdigit()]
    assert all(CLOCK.match(t) and recent_clock(t, 11) for t in times), labels  # 10 minutes up to now
    expect(stat(page, "rig-1", 0, "Energy")).to_have_text(re.compile(r"^\d+\.\d+ Wh in 10 min$"))
    hover(page, "rig-1", 0, 0.999)  # the latest point is at the right edge
    expect(legend(page, "rig-1", 0)).to_have_text([CLOCK_S, "util 30 %", "mem 6.0 GiB", "65 °C", "221 W"])


def test_hovering_a_chart_shows_the_values_at_that_moment_in_real_units(start_server, page):
    server = start_server(PUSH_RATE_LIMIT="1000", HISTORY_S="30")
    server.push_as_new_history_point(multi(gpu(0, utilizationGpu=10, memoryUsed=2048, temperatureGpu=50,
                                               powerDraw=100)))
    first = server.answered_at
    for _ in range(3):
        server.push_as_new_history_point(multi(gpu(0, utilizationGpu=90, memoryUsed=8192, temperatureGpu=81,
                                                   powerDraw=None)))
    last = server.answered_at
    written(server, 4)
    open_dashboard(page, server)
    expect(legend(page, "rig-1", 0)).to_have_text(AT_REST)
    hover(page, "rig-1", 0, 0.02)  # left of every point: the nearest is the first
    expect(legend(page, "rig-1", 0)).to_have_text([CLOCK_S, "util 10 %", "mem 2.0 GiB", "50 °C", "100 W"])
    shown = datetime.strptime(legend(page, "rig-1", 0).first.text_content(), "%H:%M:%S").time()
    assert shown in {datetime.fromtimestamp(first - d).time().replace(microsecond=0) for d in (0, 1, 2)}
    hover(page, "rig-1", 0, 0.999)
    expect(legend(page, "rig-1", 0)).to_have_text([CLOCK_S, "util 90 %", "mem 8.0 GiB", "81 °C", "– W"])
    shown = datetime.strptime(legend(page, "rig-1", 0).first.text_content(), "%H:%M:%S").time()
    assert shown in {datetime.fromtimestamp(last - d).time().replace(microsecond=0) for d in (0, 1, 2)}
    page.mouse.move(0, 0)
    expect(legend(page, "rig-1", 0)).to_have_text(AT_REST)


def test_a_stretch_without_data_is_drawn_as_a_gap(start_server, page):
    # With points 1 s apart and STALE_AFTER_S=1, 3 s from one point to the next is a gap (over 2.5 steps of 1 s).
    server = start_server(PUSH_RATE_LIMIT="1000", HISTORY_S="30", STALE_AFTER_S="1", OFFLINE_AFTER_S="60")
    only_util = {"memoryUsed": None, "temperatureGpu": None, "powerDraw": None}  # one line to look at

    def two_points():
        for util in (40, 60):
            server.push_as_new_history_point(multi(gpu(0, utilizationGpu=util, **only_util)))
    two_points()
    server.wait_past_last_push(3)  # no point for 3 s
    two_points()
    written(server, 4)
    open_dashboard(page, server)  # the gap comes from api/history
    runs = wait_for(lambda: len(r := line_runs(page, "rig-1", 0)) == 2 and r, timeout=5, interval=0.2)
    px_per_s = tile(page, "rig-1", 0).locator(".u-over").bounding_box()["width"] / 30
    assert runs[1][0] - runs[0][1] >= 2 * px_per_s, runs  # about 3 s of nothing between the lines
    server.wait_past_last_push(3)  # counted from the last push: the page watched for part of it
    two_points()  # and a gap while the page watches
    runs = wait_for(lambda: len(r := line_runs(page, "rig-1", 0)) == 3 and r, timeout=5, interval=0.2)
    assert runs[2][0] - runs[1][1] >= 2 * px_per_s, runs


def test_switching_ranges_loads_them_from_the_api_with_matching_axes(server, page):
    asked = history_requests(page)
    server.push(multi(gpu(0, utilizationGpu=55)))
    written(server, 1)
    open_dashboard(page, server)
    asked_for(page, asked, 1)
    page.get_by_role("button", name="24 h").click()
    asked_for(page, asked, 2)
    assert asked[1]["device"] == "rig-1" and int(asked[1]["to"]) - int(asked[1]["from"]) == 24 * 3600
    assert abs(int(asked[1]["to"]) - time.time()) < 5
    expect(page.get_by_role("button", name="24 h")).to_have_attribute("aria-pressed", "true")
    assert page.url.endswith("/?pc=rig-1&range=24h")
    labels = axis_labels(page, "rig-1", 0, lambda got: sum(bool(CLOCK.match(t)) for t in got) >= 2)
    assert all(t.isdigit() or CLOCK.match(t) or DATE.match(t) for t in labels), labels  # a date at midnight
    expect(stat(page, "rig-1", 0, "Energy")).to_have_text(re.compile(r" in 24 h$"))

    page.get_by_role("button", name="7 d").focus()  # the keyboard works too
    page.keyboard.press("Enter")
    asked_for(page, asked, 3)
    assert int(asked[2]["to"]) - int(asked[2]["from"]) == 7 * 86400
    labels = axis_labels(page, "rig-1", 0, lambda got: sum(bool(DATE.match(t)) for t in got) >= 2)
    dates = [t for t in labels if not t.isdigit()]
    assert all(DATE.match(t) for t in dates), labels  # dates, no clock times
    week = {f"{(datetime.now() - timedelta(days=d)).day} {(datetime.now() - timedelta(days=d)):%b}" for d in range(8)}
    assert set(dates) <= week, labels
    expect(stat(page, "rig-1", 0, "Energy")).to_have_text(re.compile(r" in 7 d$"))
    hover(page, "rig-1", 0, 0.999)  # the moment of a bucket names its day
    expect(legend(page, "rig-1", 0).first).to_have_text(re.compile(r"^\d{1,2} [A-Z][a-z]{2} \d\d:\d\d$"))

    page.reload()  # the range is kept in the URL
    expect(page.get_by_role("button", name="7 d")).to_have_attribute("aria-pressed", "true")
    asked_for(page, asked, 4)
    assert int(asked[3]["to"]) - int(asked[3]["from"]) == 7 * 86400
    page.get_by_role("button", name="10 min").click()
    asked_for(page, asked, 5)
    assert asked[4] == {"device": "rig-1"} and page.url.endswith("/?pc=rig-1")
    axis_labels(page, "rig-1", 0, lambda got: sum(bool(CLOCK.match(t)) for t in got) >= 2)


def test_charts_run_under_the_pages_csp_without_a_violation(server, page):
    server.push(multi(gpu(0), gpu(1)))
    open_dashboard(page, server)
    axis_labels(page, "rig-1", 1, lambda got: "100" in got)
    hover(page, "rig-1", 0, 0.5)  # uPlot styles its cursor and points from script (CSSOM, allowed)
    expect(legend(page, "rig-1", 0).first).to_have_text(CLOCK_S)
    page.get_by_role("button", name="30 d").click()
    axis_labels(page, "rig-1", 0, lambda got: sum(bool(DATE.match(t)) for t in got) >= 2)
    page.set_viewport_size({"width": 700, "height": 900})
    page.wait_for_timeout(300)
    assert page.evaluate("window.cspViolations") == [] and page.console_errors == []
    # The watch works: an inline style attribute is a violation it sees.
    page.evaluate("document.body.setAttribute('style', 'color: red')")
    wait_for(lambda: page.evaluate("window.cspViolations"), timeout=2)


def test_history_loads_behind_the_viewer_login(start_server, browser):
    server = start_server(DASHBOARD_PASSWORD="s3cret-viewer", **PRIVATE)
    for util in (10, 20):
        server.push_as_new_history_point(multi(gpu(0, utilizationGpu=util)))
    written(server, 2, auth=("admin", "s3cret-viewer"))  # HTTP Basic, for reading
    context = browser.new_context()
    page = context.new_page()
    page.goto(server.url + "/?pc=rig-1")  # sent to the sign-in page, where the extra viewer login works too
    page.fill("input[name=user]", "admin")
    page.fill("input[name=password]", "s3cret-viewer")
    page.click("button[type=submit]")
    expect(page.locator("#connection")).to_have_text("live")
    expect(stat(page, "rig-1", 0, "Energy")).to_have_text(re.compile(r" Wh in 10 min$"))  # the API answered
    hover(page, "rig-1", 0, 0.01)
    expect(legend(page, "rig-1", 0).nth(1)).to_have_text("util 10 %")  # older than the snapshot: from the API
    expect(page.locator(".history-note")).to_have_text("")
    context.close()


def test_charts_follow_their_tiles_width(server, page):
    server.push(multi(gpu(0)))
    open_dashboard(page, server)
    chart, box = tile(page, "rig-1", 0).locator(".uplot"), tile(page, "rig-1", 0).locator(".chart")

    def fits():
        return abs(chart.bounding_box()["width"] - box.bounding_box()["width"]) <= 1
    wait_for(fits)
    wide = chart.bounding_box()["width"]
    page.set_viewport_size({"width": 360, "height": 900})
    wait_for(fits)
    assert chart.bounding_box()["width"] < wide
    assert page.evaluate("document.documentElement.scrollWidth") <= 360


def test_a_device_that_stops_pushing_turns_stale_then_offline(start_server, page):
    # Online for 2 s after a push: long enough to be seen online on a loaded machine.
    server = start_server(STALE_AFTER_S="2", OFFLINE_AFTER_S="4")
    server.push(multi())
    open_dashboard(page, server)
    card = page.locator('section.device[data-device="rig-1"]')
    expect(card).to_have_class("device online")
    expect(card).to_have_class("device stale", timeout=5000)
    seen = card.locator(".seen")
    expect(seen).to_have_text(re.compile(r"^last seen [2-4] s ago$"), timeout=2000)
    first = seen.inner_text()
    expect(seen).not_to_have_text(first, timeout=3000)  # it counts up
    assert int(seen.inner_text().split()[2]) > int(first.split()[2])
    expect(card).to_have_class("device offline", timeout=5000)
    server.push(multi())
    expect(card).to_have_class("device online")
    expect(card.locator(".seen")).to_have_text("")
    open_dashboard(page, server, "/")  # the overview counts it offline once it is
    expect(page.locator("#total-offline")).to_have_text("1", timeout=6000)
    expect(page.locator('#pcs .pc[data-device="rig-1"]')).to_have_class(re.compile(r"\boffline\b"))


def test_large_memory_has_thousands_separators_as_power_does(server, page):
    # Issue 30: "3432.9 / 7676.3 GiB" beside "12,345 W".
    server.push(multi(gpu(0, memoryUsed=3_515_290, memoryTotal=7_860_531, memoryFree=4_345_241)))
    open_dashboard(page, server)
    expect(stat(page, "rig-1", 0, "Memory")).to_have_text("3,432.9 / 7,676.3 GiB")
    open_dashboard(page, server, "/")
    expect(page.locator("#total-vram")).to_have_text("3,432.9 / 7,676.3 GiB")


def test_a_pc_that_reads_no_gpu_is_a_problem_with_its_whole_error(server, page):
    # Issue 30: it showed a green "online" and "no alerts", its error cut mid-word.
    whole = ("nvidia-smi failed (exit 9): NVIDIA-SMI has failed because it couldn't communicate with the "
             "NVIDIA driver. Make sure that the latest NVIDIA driver is installed and running.")
    body = agent._fit(dict(multi(), gpus=[], error=whole))  # as the agent pushes it
    why = body["error"]
    assert why == whole[:whole.rindex(" ", 0, 127)] + "…" and len(why) <= 128
    assert server.push(body).status_code == 200
    open_dashboard(page, server)
    card = page.locator('section.device[data-device="rig-1"]')
    expect(card).to_have_class("device problem")
    expect(card.locator(".badge").first).to_have_text("⚠ no GPU read")
    expect(card.locator(".device-error")).to_have_text(f"Cannot read GPUs: {why}")
    expect(card.locator(".device-error")).to_have_attribute("title", why)
    server.push(multi())
    expect(card).to_have_class("device online")


def test_html_in_agent_strings_is_shown_as_text_and_runs_nothing(server, page):
    evil = '<img src=x onerror="window.pwned=1">'
    server.push(multi(gpu(0, name=evil, processes=[{"pid": 1, "name": "<b>x</b>", "memoryUsed": 1}]),
                      host="<script>window.pwned=2</script>"))
    open_dashboard(page, server)
    expect(tile(page, "rig-1", 0).locator(".gpu-name")).to_have_text(evil)
    expect(page.locator(".host")).to_have_text("host <script>window.pwned=2</script>")
    assert page.locator("main img, main b, main script").count() == 0
    assert page.evaluate("window.pwned") is None


def test_the_page_comes_back_after_a_server_restart(server, page):
    server.push(multi(gpu(0, utilizationGpu=11)))
    open_dashboard(page, server)
    server.stop()
    expect(page.locator("#connection")).to_have_text("reconnecting…")
    server.start(server.port)
    expect(page.locator("#connection")).to_have_text("live", timeout=15000)
    server.push(multi(gpu(0, utilizationGpu=42)))
    expect(stat(page, "rig-1", 0, "Util")).to_have_text("42 %")


def test_a_stream_refused_for_good_is_recreated_with_backoff(start_server, page):
    # A 503 (here the viewer cap; behind nginx, a restart) closes EventSource for good.
    server = start_server(MAX_SUBSCRIBERS="1")
    holder = Stream(server.port)
    holder.next(with_comments=True)
    page.goto(server.url + "/?pc=rig-1")
    expect(page.locator("#connection")).to_have_text("reconnecting…")
    holder.close()
    expect(page.locator("#connection")).to_have_text("live", timeout=10000)
    server.push(multi())
    expect(tile(page, "rig-1", 0)).to_be_visible()


def test_usable_on_a_390px_phone_without_sideways_scroll(server, browser):
    long = "render-box-with-a-rather-long-name-" * 3
    server.push(multi(gpu(0, name=long), gpu(1), host=long))
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
    page = context.new_page()
    open_dashboard(page, server)
    expect(tile(page, "rig-1", 1)).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    context.close()


def test_device_filter_shows_only_those_devices(server, page):
    for device in ("rig-1", "rig-2", "rig-3"):
        server.push(multi(), device=device)
    open_dashboard(page, server, "/?device=rig-3,rig-1")
    expect(page.locator("#pcs .pc-name")).to_have_text(["rig-1", "rig-3"])
    server.push(multi(), device="rig-2")
    server.push(multi(gpu(0, utilizationGpu=3)), device="rig-3")
    expect(page.locator('#pcs .pc[data-device="rig-3"] .cell .util')).to_have_text("3%")
    expect(page.locator("#pcs .pc-name")).to_have_text(["rig-1", "rig-3"])


def test_page_headers_allow_no_inline_script_and_assets_are_cached(server):
    overview = requests.get(server.url + "/", timeout=5).text
    assert "uPlot" not in overview and "charts.js" not in overview  # the overview draws no charts
    page = requests.get(server.url + "/?pc=rig-1", timeout=5)
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "<script>" not in page.text and "<style>" not in page.text and "http" not in page.text.split("<body")[0]
    assert re.search(r'<script src="/static/uPlot\.iife\.min\.js\?v=\w+" defer>', page.text)  # served here, no CDN
    asset = page.text.split('src="')[1].split('"')[0]
    cached = requests.get(server.url + asset, timeout=5)
    assert cached.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    stale = requests.get(server.url + "/static/dashboard.js?v=old", timeout=5)
    assert stale.headers["Cache-Control"] == "no-cache" and stale.headers.get("ETag")
    assert requests.get(server.url + "/healthz", timeout=5).headers["X-Content-Type-Options"] == "nosniff"


def test_the_page_survives_a_killed_worker_and_the_next_push_rebuilds_it(server, page):
    server.push(multi(gpu(0, utilizationGpu=11)), device="rig-4")
    open_dashboard(page, server, "/?pc=rig-4")
    old = server.worker_pid
    os.kill(old, signal.SIGKILL)
    expect(page.locator("#connection")).to_have_text("reconnecting…")
    expect(page.locator("#connection")).to_have_text("live", timeout=20000)
    assert server.worker_pid != old
    server.push(multi(gpu(0, utilizationGpu=64)), device="rig-4")  # the agent's next push
    expect(stat(page, "rig-4", 0, "Util")).to_have_text("64 %")
    expect(page.locator('section.device[data-device="rig-4"]')).to_have_class("device online")
