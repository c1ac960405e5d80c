"""The dashboard in a real headless Chromium against the real server."""
import os
import signal

import requests
from playwright.sync_api import expect

from conftest import Stream, gpu, multi


def open_dashboard(page, server, path="/"):
    page.goto(server.url + path)
    expect(page.locator("#connection")).to_have_text("live")


def tile(page, device, index):
    return page.locator(f'section.device[data-device="{device}"] article.gpu[data-index="{index}"]')


def stat(page, device, index, label):
    return tile(page, device, index).locator(".stat", has=page.locator("dt", has_text=label)).locator("dd")


def test_fleet_appears_with_readable_values_and_totals(server, page):
    server.push(multi(gpu(0), gpu(1, powerDraw=None, utilizationGpu=5, temperatureGpu=91)), device="rig-1")
    server.push({"name": "NVIDIA RTX 3080", "vendor": "NVIDIA", "temperatureGpu": 65, "utilizationGpu": 80},
                device="rig-2")
    open_dashboard(page, server)
    expect(page.locator("section.device h2")).to_have_text(["rig-1", "rig-2"])
    expect(tile(page, "rig-1", 0).locator(".gpu-id")).to_have_text("rig-1:0")
    expect(tile(page, "rig-1", 0).locator(".gpu-name")).to_have_text("NVIDIA GeForce RTX 3080")
    expect(stat(page, "rig-1", 0, "Util")).to_have_text("80 %")
    expect(stat(page, "rig-1", 0, "Memory")).to_have_text("6.0 / 10.0 GiB")
    expect(stat(page, "rig-1", 0, "Temp")).to_have_text("65 °C")
    expect(stat(page, "rig-1", 0, "Power")).to_have_text("221 / 320 W")
    expect(stat(page, "rig-1", 0, "Fan")).to_have_text("55 %")
    expect(stat(page, "rig-1", 0, "Clocks")).to_have_text("1,905 / 9,501 MHz")
    expect(tile(page, "rig-1", 0).locator(".processes li")).to_have_text(["4242 python2.0 GiB"])
    expect(stat(page, "rig-1", 1, "Power")).to_have_text("–")  # not reported: a dash, not 0
    expect(stat(page, "rig-1", 1, "Temp")).to_have_class("level-hot")
    expect(stat(page, "rig-2", 0, "Memory")).to_have_text("–")
    expect(stat(page, "rig-2", 0, "Fan")).to_be_hidden()  # not sent at all: no row
    for name, value in [("online", "2"), ("gpus", "3"), ("busy", "2"), ("vram", "12.0 / 20.0 GiB"),
                        ("power", "221 W"), ("offline", "0")]:
        expect(page.locator(f"#total-{name}")).to_have_text(value)
    assert page.console_errors == []


def test_values_and_charts_update_live_and_the_dom_does_not_grow(server, page):
    for util in (10, 20, 30):
        server.push_as_new_history_point(multi(gpu(0, utilizationGpu=util)))
    open_dashboard(page, server)
    line = tile(page, "rig-1", 0).locator("polyline.util")
    assert len(line.get_attribute("points").split()) == 3  # drawn at once from the snapshot's history
    nodes = page.evaluate("document.getElementsByTagName('*').length")
    server.push_as_new_history_point(multi(gpu(0, utilizationGpu=40)))  # a 4th point, then 29 pushes into it
    for util in range(42, 100, 2):
        server.push(multi(gpu(0, utilizationGpu=util)))
    expect(stat(page, "rig-1", 0, "Util")).to_have_text("98 %")
    server.push_as_new_history_point(multi(gpu(0, utilizationGpu=7)))
    expect(stat(page, "rig-1", 0, "Util")).to_have_text("7 %")
    assert len(line.get_attribute("points").split()) == 5  # extended live, one point a second
    assert page.evaluate("document.getElementsByTagName('*').length") == nodes


def test_a_device_that_stops_pushing_turns_stale_then_offline(start_server, page):
    server = start_server(STALE_AFTER_S="1", OFFLINE_AFTER_S="3")
    server.push(multi())
    open_dashboard(page, server)
    card = page.locator('section.device[data-device="rig-1"]')
    expect(card).to_have_class("device online")
    expect(card).to_have_class("device stale", timeout=4000)
    expect(card.locator(".seen")).to_have_text("last seen 1 s ago", timeout=2000)
    expect(card.locator(".seen")).to_have_text("last seen 2 s ago", timeout=2000)  # counts up
    expect(card).to_have_class("device offline", timeout=4000)
    expect(page.locator("#total-offline")).to_have_text("1")
    server.push(multi())
    expect(card).to_have_class("device online")
    expect(card.locator(".seen")).to_have_text("")


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
    page.goto(server.url + "/")
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
    expect(page.locator("section.device h2")).to_have_text(["rig-1", "rig-3"])
    server.push(multi(), device="rig-2")
    server.push(multi(gpu(0, utilizationGpu=3)), device="rig-3")
    expect(stat(page, "rig-3", 0, "Util")).to_have_text("3 %")
    expect(page.locator("section.device h2")).to_have_text(["rig-1", "rig-3"])


def test_page_headers_allow_no_inline_script_and_assets_are_cached(server):
    page = requests.get(server.url + "/", timeout=5)
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "<script>" not in page.text and "<style>" not in page.text and "http" not in page.text.split("<body")[0]
    asset = page.text.split('src="')[1].split('"')[0]
    cached = requests.get(server.url + asset, timeout=5)
    assert cached.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    stale = requests.get(server.url + "/static/dashboard.js?v=old", timeout=5)
    assert stale.headers["Cache-Control"] == "no-cache" and stale.headers.get("ETag")
    assert requests.get(server.url + "/healthz", timeout=5).headers["X-Content-Type-Options"] == "nosniff"


def test_the_page_survives_a_killed_worker_and_the_next_push_rebuilds_it(server, page):
    server.push(multi(gpu(0, utilizationGpu=11)), device="rig-4")
    open_dashboard(page, server)
    old = server.worker_pid
    os.kill(old, signal.SIGKILL)
    expect(page.locator("#connection")).to_have_text("reconnecting…")
    expect(page.locator("#connection")).to_have_text("live", timeout=20000)
    assert server.worker_pid != old
    server.push(multi(gpu(0, utilizationGpu=64)), device="rig-4")  # the agent's next push
    expect(stat(page, "rig-4", 0, "Util")).to_have_text("64 %")
    expect(page.locator('section.device[data-device="rig-4"]')).to_have_class("device online")
