"""The fleet overview in a real headless Chromium against the real server: a row per PC, a cell per GPU."""
import re
import time
from urllib.parse import urlsplit

import pytest
import requests
from playwright.sync_api import expect

from conftest import PRIVATE, Admin, gpu, multi, wait_for

FLEET = {f"pc-{i:02}": f"test-key-pc-{i:02}-0123456789" for i in range(1, 41)}  # 40 PCs of 8 GPUs
ROWS = "#pcs .pc:not([hidden])"
FREE = {"utilizationGpu": 0, "memoryUsed": 100, "processes": []}  # under 5 % of both


def fleet_gpu(pc, index):
    """A GPU of PC number `pc`: busy, free, hot or in use, as its place in the fleet says."""
    kind = (pc + index) % 4
    fields = [{"utilizationGpu": 90}, FREE, {"utilizationGpu": 60, "temperatureGpu": 86},
              {"utilizationGpu": 10}][kind]
    users = [{"pid": 100 + index, "name": f"train-{pc}.py", "user": f"user{pc % 7}", "memoryUsed": 2048}]
    return gpu(index, **{"processes": users, **fields})


def rows(page):
    return page.locator(f"{ROWS} .pc-name")


def cells(page):
    return page.locator(f"{ROWS} .cell:not([hidden])")


def cell(page, device, index):
    return page.locator(f'#pcs .pc[data-device="{device}"] .cell[data-index="{index}"]')


def open_overview(page, server, path="/"):
    page.goto(server.url + path)
    expect(page.locator("#connection")).to_have_text("live")


@pytest.fixture
def fleet_page(browser):
    """A 1920x1080 page, the screen the overview is sized for."""
    context = browser.new_context(viewport={"width": 1920, "height": 1080})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert errors == []


def test_a_fleet_of_40_pcs_of_8_gpus_reads_in_two_screens_and_updates_in_place(start_server, fleet_page):
    page = fleet_page
    server = start_server(PUSH_RATE_LIMIT="1000", DEVICE_KEYS=",".join(f"{d}:{k}" for d, k in FLEET.items()))
    for n, (device, key) in enumerate(FLEET.items(), 1):
        assert server.push(dict(multi(*(fleet_gpu(n, i) for i in range(8)), host=device), system=SYSTEM),
                           device=device, key=key).ok
    open_overview(page, server)
    expect(rows(page)).to_have_count(40)
    expect(cells(page)).to_have_count(320)
    expect(page.locator("#shown-count")).to_have_text("320 GPUs")
    # pc-01's GPU 0 is kind 1 (free), GPU 1 kind 2 (hot), GPU 2 kind 3 (in use), GPU 3 kind 0 (busy).
    expect(cell(page, "pc-01", 0)).to_have_class("cell free")
    expect(cell(page, "pc-01", 0).locator(".glyph")).to_have_text("○")
    expect(cell(page, "pc-01", 1)).to_have_class("cell hot")
    expect(cell(page, "pc-01", 1).locator(".glyph")).to_have_text("▲")
    expect(cell(page, "pc-01", 2)).to_have_class("cell used")
    expect(cell(page, "pc-01", 3)).to_have_class("cell busy")
    expect(cell(page, "pc-01", 3).locator(".glyph")).to_have_text("●")
    expect(cell(page, "pc-01", 3).locator(".v")).to_have_text(["90%", "60%", "65°"])
    expect(cell(page, "pc-01", 3).locator(".who")).to_have_text("user1 train-1.py")
    expect(cell(page, "pc-01", 3)).to_have_attribute("title", re.compile(r"^pc-01:3 NVIDIA GeForce RTX 3080 — busy\n"))
    expect(page.locator(".fleet-key li")).to_have_count(8)  # every state's glyph, with words
    overview = page.locator("#overview").bounding_box()
    bottom = overview["y"] + overview["height"] + page.evaluate("scrollY")
    print(f"the overview of 40 x 8 GPUs ends {bottom:.0f} px down at 1920x1080")
    assert bottom <= 2 * 1080, bottom
    # A push changes its cells' text in place: no node is added or replaced.
    nodes = page.evaluate("document.querySelectorAll('#overview *').length")
    node = cell(page, "pc-07", 5).element_handle()
    server.push(multi(*(fleet_gpu(7, i) for i in range(5)), gpu(5, utilizationGpu=42, temperatureGpu=50),
                      *(fleet_gpu(7, i) for i in range(6, 8)), host="pc-07"), device="pc-07", key=FLEET["pc-07"])
    expect(cell(page, "pc-07", 5).locator(".util")).to_have_text("42%")
    expect(cell(page, "pc-07", 5)).to_have_class("cell busy")
    assert node.evaluate("n => n.isConnected") and page.evaluate("document.querySelectorAll('#overview *').length") == nodes


def test_a_row_below_the_screen_shows_the_latest_push_once_scrolled_to(start_server, fleet_page):
    # Rows off the screen are drawn when they come into view (issue 32: a push nobody sees costs
    # no layout): what the user scrolls to is the latest, however many pushes it missed.
    page = fleet_page
    server = start_server(PUSH_RATE_LIMIT="1000", DEVICE_KEYS=",".join(f"{d}:{k}" for d, k in FLEET.items()))
    for n, (device, key) in enumerate(FLEET.items(), 1):
        assert server.push(multi(*(fleet_gpu(n, i) for i in range(8)), host=device), device=device, key=key).ok
    open_overview(page, server)
    expect(cells(page)).to_have_count(320)
    last = cell(page, "pc-40", 0)
    expect(last).not_to_be_in_viewport()
    free = int(page.locator("#free-gpus .n").text_content())
    assert fleet_gpu(40, 1)["utilizationGpu"] == 0  # pc-40's GPU 1 is free: taken below
    for util in (31, 32, 33):
        server.push(multi(gpu(0, utilizationGpu=util, processes=[{"pid": 9, "name": "late.py", "user": "zoe"}]),
                          gpu(1, utilizationGpu=util), *(fleet_gpu(40, i) for i in range(2, 8)), host="pc-40"),
                    device="pc-40", key=FLEET["pc-40"])
    expect(page.locator("#free-gpus .n")).to_have_text(str(free - 1))  # counts follow every push, seen or not
    expect(last).not_to_be_in_viewport()
    last.scroll_into_view_if_needed()
    expect(last.locator(".util")).to_have_text("33%")
    expect(last.locator(".who")).to_have_text("zoe late.py")
    expect(last).to_have_class("cell busy")
    page.locator("#search").fill("zoe")  # and search finds what was pushed while it was off the screen
    expect(rows(page)).to_have_text(["pc-40"])


def test_search_narrows_as_you_type_by_pc_gpu_user_or_process(server, page):
    server.push(multi(gpu(0, name="NVIDIA RTX 4090", processes=[{"pid": 1, "name": "python3", "user": "ana",
                                                                 "command": "python3 train.py", "startedAt": 1.7e9}]),
                      gpu(1, name="NVIDIA RTX 4090", processes=[])), device="rig-1")
    server.push(multi(gpu(0, name="NVIDIA A100", processes=[{"pid": 2, "name": "blender", "user": "bo"}])),
                device="rig-2")
    server.push(multi(gpu(0, name="NVIDIA A100", processes=[])), device="rig-3")
    open_overview(page, server)
    expect(rows(page)).to_have_text(["rig-1", "rig-2", "rig-3"])
    expect(cell(page, "rig-1", 0).locator(".who")).to_have_text("ana python3 train.py")  # who, and what: its command
    search = page.locator("#search")
    assert search.get_attribute("type") == "search"
    for query, shown, count in [("rig-3", ["rig-3"], 1), ("a100", ["rig-2", "rig-3"], 2), ("ana", ["rig-1"], 1),
                                ("BLENDER", ["rig-2"], 1), ("train.py", ["rig-1"], 1), ("4090", ["rig-1"], 2), ("rig-1:1", ["rig-1"], 1),
                                ("nobody", [], 0)]:
        search.fill(query)
        expect(rows(page)).to_have_text(shown)
        expect(cells(page)).to_have_count(count)
    expect(page.locator("#shown-count")).to_have_text("0 of 4 GPUs")
    search.fill("rig-")
    expect(rows(page)).to_have_text(["rig-1", "rig-2", "rig-3"])
    assert page.url.endswith("/?q=rig-")
    search.fill("")
    assert page.url.endswith("/")


def test_status_and_state_filters(start_server, page):
    server = start_server(PUSH_RATE_LIMIT="1000", STALE_AFTER_S="3", OFFLINE_AFTER_S="60")
    server.push(multi(gpu(0)), device="rig-5")  # goes stale while the others push

    def fresh():
        server.push(multi(gpu(0, utilizationGpu=90), gpu(1, **FREE)), device="rig-1")
        server.push(multi(gpu(0, temperatureGpu=88)), device="rig-2")
        server.push(dict(multi(), gpus=[], error="nvidia-smi failed"), device="rig-3")
        server.push(multi(gpu(0, error="GPU is lost", utilizationGpu=None)), device="rig-4")
    open_overview(page, server)
    expect(page.locator('#pcs .pc[data-device="rig-5"]')).to_have_class(re.compile(r"\bstale\b"), timeout=6000)
    fresh()
    expect(rows(page)).to_have_text(["rig-1", "rig-2", "rig-3", "rig-4", "rig-5"])
    expect(page.locator('#pcs .pc[data-device="rig-3"] .pc-status')).to_have_text("⚠ no GPU read")
    expect(cell(page, "rig-4", 0)).to_have_class("cell error")
    expect(cell(page, "rig-5", 0)).to_have_class("cell stale")
    for buttons, shown in [(["stale"], ["rig-5"]), (["problem"], ["rig-3", "rig-4"]),
                           (["online"], ["rig-1", "rig-2", "rig-4"]), (["online", "stale"], ["rig-1", "rig-2", "rig-4", "rig-5"]),
                           (["offline"], [])]:
        fresh()  # rig-1 to rig-4 stay online (STALE_AFTER_S is 3 s) however long a step takes
        for name in buttons:
            page.locator(f'#overview [data-status="{name}"]').click()
        expect(rows(page)).to_have_text(shown)
        assert f"status={'%2C'.join(buttons)}" in page.url
        for name in buttons:
            page.locator(f'#overview [data-status="{name}"]').click()
    for name, shown, count in [("busy", ["rig-1", "rig-2"], 2), ("free", ["rig-1"], 1), ("hot", ["rig-2"], 1)]:
        fresh()  # as above: a state is a state of an online PC, and the page shows a push up to a second late
        page.locator(f'#overview [data-state="{name}"]').click()
        expect(rows(page)).to_have_text(shown)
        expect(cells(page)).to_have_count(count)
        assert f"state={name}" in page.url
        page.locator(f'#overview [data-state="{name}"]').click()
    expect(rows(page)).to_have_count(5)
    assert page.url.endswith("/")


def test_sorting_by_each_column(server, page):
    server.push(multi(gpu(0, utilizationGpu=10, memoryUsed=9000, temperatureGpu=70, powerDraw=100)), device="rig-1")
    server.push(multi(gpu(0, utilizationGpu=99, memoryUsed=1000, temperatureGpu=40, powerDraw=300)), device="rig-2")
    server.push(multi(gpu(0, utilizationGpu=50, memoryUsed=5000, temperatureGpu=90, powerDraw=50),
                      gpu(1, powerDraw=60)), device="rig-3")
    time.sleep(1.1)
    server.push(multi(gpu(0, utilizationGpu=10, memoryUsed=9000, temperatureGpu=70, powerDraw=100)), device="rig-1")
    open_overview(page, server)
    expect(rows(page)).to_have_text(["rig-1", "rig-2", "rig-3"])
    for key, order in [("util", ["rig-2", "rig-3", "rig-1"]), ("mem", ["rig-1", "rig-3", "rig-2"]),
                       ("temp", ["rig-3", "rig-1", "rig-2"]), ("power", ["rig-2", "rig-3", "rig-1"]),
                       ("seen", ["rig-2", "rig-3", "rig-1"]), ("name", ["rig-1", "rig-2", "rig-3"])]:
        page.select_option("#sort", key)
        expect(rows(page)).to_have_text(order)
        assert page.url.endswith("/" if key == "name" else f"/?sort={key}")
    page.select_option("#sort", "util")
    server.push(multi(gpu(0, utilizationGpu=100)), device="rig-1")  # a push moves its row
    expect(rows(page)).to_have_text(["rig-1", "rig-2", "rig-3"])


def test_the_view_is_kept_in_the_url_across_a_reload_with_device_and_range(server, page):
    for device in ("rig-1", "rig-2", "rig-3"):
        server.push(multi(gpu(0, utilizationGpu=90 if device != "rig-2" else 0, memoryUsed=100)), device=device)
    open_overview(page, server, "/?device=rig-1,rig-2,rig-3&range=24h")
    page.locator("#search").fill("rig")
    page.locator('#overview [data-state="busy"]').click()
    page.locator('#overview [data-status="online"]').click()
    page.select_option("#sort", "temp")
    expect(rows(page)).to_have_text(["rig-1", "rig-3"])
    query = page.url.split("?", 1)[1]
    assert set(query.split("&")) == {"device=rig-1%2Crig-2%2Crig-3", "range=24h", "q=rig", "state=busy",
                                     "status=online", "sort=temp"}, query
    page.reload()
    expect(page.locator("#connection")).to_have_text("live")
    expect(rows(page)).to_have_text(["rig-1", "rig-3"])
    expect(page.locator("#search")).to_have_value("rig")
    expect(page.locator('#overview [data-state="busy"]')).to_have_attribute("aria-pressed", "true")
    expect(page.locator('#overview [data-status="online"]')).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#sort")).to_have_value("temp")
    # The range is the detail's: a PC's link takes it there.
    expect(page.locator('#pcs .pc[data-device="rig-1"] .pc-name')).to_have_attribute("href", "?pc=rig-1&range=24h")
    page.goto(server.url + "/?device=rig-2&state=free")  # a shared link, with the stream's own filter
    expect(rows(page)).to_have_text(["rig-2"])
    expect(page.locator("#free-gpus")).to_have_attribute("aria-pressed", "true")


def test_free_gpus_shows_only_free_gpus_and_how_long_they_have_been_free(start_server, page):
    server = start_server(PUSH_RATE_LIMIT="1000", STALE_AFTER_S="30", OFFLINE_AFTER_S="60")
    server.push(multi(gpu(0, **FREE), gpu(1, utilizationGpu=90), gpu(2, utilizationGpu=2, memoryUsed=4096)),
                device="rig-1")
    server.push(multi(gpu(0, utilizationGpu=3, memoryUsed=200, processes=[])), device="rig-2")  # 2 % of memory
    open_overview(page, server)
    expect(page.locator("#free-gpus .n")).to_have_text("2")
    page.locator("#free-gpus").click()
    assert page.url.endswith("/?state=free")
    expect(page.locator("#free-gpus")).to_have_attribute("aria-pressed", "true")
    expect(cells(page)).to_have_count(2)  # rig-1's GPU 2 holds 40 % of its memory: not free
    expect(cell(page, "rig-1", 0).locator(".who")).to_have_text("free since you opened the page")
    expect(cell(page, "rig-2", 0).locator(".who")).to_have_text("free since you opened the page")
    server.push(multi(gpu(0, **FREE), gpu(1, **FREE), gpu(2, utilizationGpu=2, memoryUsed=4096)), device="rig-1")
    expect(cells(page)).to_have_count(3)
    expect(cell(page, "rig-1", 1).locator(".who")).to_have_text("free for under a minute")
    expect(cell(page, "rig-1", 0).locator(".who")).to_have_text("free since you opened the page")
    server.push(multi(gpu(0, utilizationGpu=70), gpu(1, **FREE), gpu(2, utilizationGpu=2, memoryUsed=4096)),
                device="rig-1")  # taken
    expect(cells(page)).to_have_count(2)
    expect(page.locator("#free-gpus .n")).to_have_text("2")
    page.locator("#free-gpus").click()  # and back to every GPU
    expect(cells(page)).to_have_count(4)
    assert page.url.endswith("/")


def test_pushed_strings_in_the_overview_stay_text(server, page):
    evil = '<img src=x onerror="window.pwned=1">'
    server.push(multi(gpu(0, name=evil, processes=[{"pid": 1, "name": "<b>x</b>", "user": evil}])))
    open_overview(page, server)
    expect(cell(page, "rig-1", 0).locator(".who")).to_have_text(f"{evil} <b>x</b>")
    page.locator("#search").fill("<b>")
    expect(cells(page)).to_have_count(1)
    assert page.locator("#overview img, #overview b").count() == 0 and page.evaluate("window.pwned") is None


def test_a_click_opens_a_pcs_or_a_gpus_detail_at_its_own_url_and_back_keeps_the_view(server, page):
    history, streams = [], []
    page.on("request", lambda r: history.append(r.url) if "/api/history" in r.url else None)
    page.on("request", lambda r: streams.append(urlsplit(r.url).query) if "/gpu/stream" in r.url else None)
    for device in ("rig-1", "rig-2", "rig-3", "rig-4", "rig-5", "rig-6"):
        server.push(multi(*(gpu(i, processes=[{"pid": 7 + i, "name": "train.py", "user": "ana"}]) for i in range(6))),
                    device=device)
    # History is written in batches: rig-6's detail loads it once, and its energy needs that point.
    wait_for(lambda: requests.get(server.url + "/api/history", params={"device": "rig-6"}, timeout=5).json()["gpus"],
             interval=0.1, what="rig-6's history written")
    open_overview(page, server, "/?sort=temp")
    page.locator("#search").fill("rig-")
    expect(rows(page)).to_have_count(6)
    # The overview draws no charts and asks for no history: 36 GPUs, not one canvas.
    assert page.locator("canvas, .chart").count() == 0 and history == []
    page.locator('#pcs .pc[data-device="rig-6"] .pc-name').click()
    expect(page).to_have_url(re.compile(r"/\?pc=rig-6$"))
    expect(page.locator("#connection")).to_have_text("live")
    expect(page.locator("section.device h2")).to_have_text(["rig-6"])  # that PC alone, with its charts
    expect(page.locator("section.device article.gpu canvas")).to_have_count(6)
    expect(page.locator('article.gpu[data-index="0"] .processes .puser')).to_have_text("ana")
    expect(page.locator('article.gpu[data-index="0"] .stat.energy dd')).to_have_text(re.compile(r" in 10 min$"))
    assert page.locator("#overview").count() == 0 and "rig-6" in page.title()
    # The overview shows changes once a second and asks for its stream so; the detail's charts take every push.
    assert streams == ["every=1", "device=rig-6"], streams
    page.go_back()  # Back: the overview as it was left
    expect(page).to_have_url(re.compile(r"/\?sort=temp&q=rig-$"))
    expect(page.locator("#search")).to_have_value("rig-")
    cell(page, "rig-2", 5).click(position={"x": 150, "y": 20})  # anywhere on a cell: here, on who runs on it
    expect(page).to_have_url(re.compile(r"/\?pc=rig-2&gpu=5$"))
    focused = page.locator('article.gpu[data-index="5"]')
    expect(focused).to_have_class(re.compile(r"\bfocus\b"))
    expect(focused).to_be_in_viewport()
    page.locator("#back").click()  # the detail's own way back, to the view it came from
    expect(page).to_have_url(re.compile(r"/\?sort=temp&q=rig-$"))
    expect(page.locator("#sort")).to_have_value("temp")
    page.goto(server.url + "/?pc=nobody")  # a name no device has: said, not an empty page
    expect(page.locator("#empty")).to_contain_text("nobody has not pushed")


def test_a_phone_shows_40_pcs_of_8_gpus_in_under_10_screens_without_sideways_scroll(start_server, browser):
    server = start_server(PUSH_RATE_LIMIT="1000", DEVICE_KEYS=",".join(f"{d}:{k}" for d, k in FLEET.items()))
    for n, (device, key) in enumerate(FLEET.items(), 1):
        assert server.push(dict(multi(*(fleet_gpu(n, i) for i in range(8)), host=device), system=SYSTEM),
                           device=device, key=key).ok
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
    page = context.new_page()
    open_overview(page, server)
    expect(cells(page)).to_have_count(320)
    tall, wide = page.evaluate("[document.documentElement.scrollHeight, document.documentElement.scrollWidth]")
    print(f"40 x 8 GPUs on a 390x844 phone: {tall} px, {tall / 844:.1f} screens")
    assert tall <= 10 * 844 and wide <= 390, (tall, wide)
    box = cell(page, "pc-01", 1).bounding_box()  # two cells a row, each with its values whole
    assert box["width"] < 195 and box["x"] + box["width"] <= 390
    cell(page, "pc-01", 1).click()
    expect(page.locator("section.device article.gpu canvas")).to_have_count(8)
    expect(page.locator('article.gpu[data-index="1"]')).to_be_in_viewport()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # the detail fits the width too
    context.close()


def test_a_share_link_opens_a_kiosk_overview_of_its_devices_dark_on_request(start_server, browser):
    server = start_server(**PRIVATE)
    for device in ("rig-1", "rig-2", "rig-3"):
        server.push(multi(gpu(0, utilizationGpu=90), gpu(1)), device=device)
    made = Admin(server).post("/api/shares", json={"name": "lab-tv", "devices": ["rig-1", "rig-3"]})
    context = browser.new_context(viewport={"width": 1920, "height": 1080}, color_scheme="light")
    page = context.new_page()
    page.goto(made.json()["url"] + "?theme=dark")  # the wall's scheme, whatever the system's
    expect(page).to_have_url(server.url + "/?device=rig-1,rig-3&theme=dark")
    expect(page.locator("#connection")).to_have_text("live")
    expect(page.locator("body")).to_have_class(re.compile(r"\bkiosk\b"))
    expect(rows(page)).to_have_text(["rig-1", "rig-3"])  # the link's devices, and no others
    expect(page.locator("#search")).to_be_visible()  # no controls but search
    for control in ("#free-gpus", '[data-status="online"]', '[data-state="busy"]', "#sort", ".account-menu"):
        expect(page.locator(control)).to_be_hidden()
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(15, 18, 22)"  # dark, asked for
    big = page.evaluate("parseFloat(getComputedStyle(document.querySelector('.cell')).fontSize)")
    assert big >= 14, big  # larger type than the desk's 12 px, read across a room
    page.locator("#search").fill("rig-3")
    expect(rows(page)).to_have_text(["rig-3"])
    page.goto(server.url + "/?pc=rig-2")  # a detail outside the link shows nothing of it
    expect(page.locator("#connection")).to_have_text("live")
    expect(page.locator("#empty")).to_be_visible()
    assert page.locator("section.device").count() == 0
    context.close()


def test_a_gpus_alerts_show_on_its_cell_and_a_hot_alert_makes_it_hot(start_server, page):
    server = start_server(PUSH_RATE_LIMIT="1000", ALERT_FOR_S="0", ALERT_TEMP_C="30")
    server.push(multi(gpu(0, temperatureGpu=45), gpu(1, temperatureGpu=20)))  # 45 °C: under the page's 80
    open_overview(page, server)
    expect(cell(page, "rig-1", 0)).to_have_class("cell hot")
    expect(cell(page, "rig-1", 0)).to_have_attribute("data-alert", re.compile(r"^(critical|warning)$"))
    expect(cell(page, "rig-1", 1)).to_have_class("cell busy")
    expect(cell(page, "rig-1", 1)).not_to_have_attribute("data-alert", re.compile(".*"))
    expect(page.locator("#alert-count")).to_have_text("1 alert")


def test_a_hidden_tab_holds_pushes_and_shows_the_latest_when_seen_again(server, browser, tmp_path):
    # Playwright's own pages emulate focus and read "visible" behind another tab: this Chromium is
    # attached to without its defaults, as `make bench BENCH_ARGS=--page` does, so a tab really hides.
    from bench.page import start_chromium, stop_chromium
    server.push(multi(gpu(0, utilizationGpu=10)))
    chromium, endpoint = start_chromium(tmp_path)
    attached = browser.browser_type.connect_over_cdp(endpoint, no_defaults=True)  # the suite's Playwright
    try:
        page = attached.contexts[0].pages[0]
        open_overview(page, server)
        expect(cell(page, "rig-1", 0).locator(".util")).to_have_text("10%")
        other = attached.contexts[0].new_page()
        other.bring_to_front()
        wait_for(lambda: page.evaluate("document.visibilityState") == "hidden", timeout=5)
        for util in (20, 30, 40):
            server.push(multi(gpu(0, utilizationGpu=util)))
        server.push(multi(gpu(0, utilizationGpu=50)), device="rig-2")  # a PC it had not seen
        page.wait_for_timeout(500)
        assert page.locator(".cell .util").all_text_contents() == ["10%"]  # no DOM work while unseen
        page.bring_to_front()
        expect(cell(page, "rig-1", 0).locator(".util")).to_have_text("40%")  # the latest, at once
        expect(cell(page, "rig-2", 0).locator(".util")).to_have_text("50%")
        expect(page.locator("#total-gpus")).to_have_text("2")
    finally:
        attached.close()
        stop_chromium(chromium)


SYSTEM = {"os": "Ubuntu 24.04.1 LTS", "cpuModel": "AMD EPYC 9654 96-Core Processor", "cpuCount": 192, "cpuPercent": 37.5,
          "load1": 41.2, "memoryTotal": 1547521, "memoryUsed": 402113, "swapUsed": 0,
          "disks": [{"mount": "/", "total": 1831420, "used": 620013}, {"mount": "/data", "total": 1000, "used": 910}],
          "netRx": 1250000.0, "netTx": 83000.5, "temperatureCpu": 61, "uptimeS": 1209600}  # SPEC's example, and a fuller disk


def test_each_pcs_cpu_memory_disk_and_network_show_in_its_row_and_its_detail(start_server, page):
    server = start_server(ALERT_FOR_S="0", ALERT_DISK_PCT="90")  # /data, 91 % full, fires DiskFull at once
    server.push(dict(multi(gpu(0)), system=SYSTEM))
    server.push(multi(gpu(0)), device="rig-2")  # an agent that sends no system: nothing in its place
    open_overview(page, server)
    host = page.locator('#pcs .pc[data-device="rig-1"] .pc-host')
    expect(host).to_have_text("cpu 38% · mem 26% · disk 91% · ↓1.3M ↑83k")  # the fullest disk
    assert "AMD EPYC 9654" in host.get_attribute("title") and "/data 91% full" in host.get_attribute("title")
    expect(page.locator('#pcs .pc[data-device="rig-2"] .pc-host')).to_be_hidden()
    alert = page.locator('#pcs .pc[data-device="rig-1"] .pc-alert')  # the PC's own alert, by its name
    expect(alert).to_have_text("▲ Disk full")
    expect(alert).to_have_attribute("title", re.compile(r"^rig-1's disk /data is 91 % full"))
    expect(page.locator('#pcs .pc[data-device="rig-1"]')).to_have_attribute("data-alert", "warning")
    page.goto(server.url + "/?pc=rig-1")
    rows = page.locator("section.device .stats.system .stat")
    expect(rows.locator("dt")).to_have_text(["CPU", "Memory", "Disk /", "Disk /data", "Network", "System", "Up"])
    expect(rows.locator("dd")).to_have_text(["38 % of 192 threads · 61 °C · load 41.2", "392.7 / 1,511.3 GiB",
                                             "605.5 / 1,788.5 GiB (34 %)", "0.9 / 1.0 GiB (91 %)",
                                             "in 1.25 MB/s · out 0.08 MB/s",
                                             "Ubuntu 24.04.1 LTS · AMD EPYC 9654 96-Core Processor", "14 d"])
    chart = page.locator("section.device .system-chart")  # its CPU and memory over the range, as a GPU's chart
    expect(chart.locator("canvas")).to_have_count(1)
    expect(chart.locator(".legend span:not(:empty)")).to_have_text(["cpu %", "memory %"])
