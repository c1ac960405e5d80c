"""The Jobs page in a real headless Chromium against the real server: who ran what, where, for how long."""
import re

import requests
from playwright.sync_api import expect

from conftest import gpu, multi, wait_for

TRAIN = {"pid": 4242, "name": "python3", "command": "python3 train.py", "user": "alice", "memoryUsed": 20_000}
RENDER = {"pid": 77, "name": "blender", "command": "blender scene.blend", "user": "bob", "memoryUsed": 6_000}
NOTEBOOK = {"pid": 9, "name": "python3", "command": "python3 notebook.py", "user": "alice", "memoryUsed": 2_000}


def jobs_written(server, count, ended=0):
    """Wait until /api/jobs holds `count` jobs, `ended` of them ended: the tracker writes off the push's path."""
    def written():
        jobs = requests.get(server.url + "/api/jobs", timeout=5).json()["jobs"]
        return len(jobs) >= count and sum(bool(job["ended"]) for job in jobs) >= ended
    wait_for(written, timeout=15, interval=0.2)


def test_the_jobs_page_lists_sorts_and_searches_jobs_and_reports_usage_per_user_and_pc(start_server, page):
    server = start_server(PUSH_RATE_LIMIT="1000")
    server.push(multi(gpu(0, utilizationGpu=90, processes=[TRAIN]), gpu(1, utilizationGpu=90, processes=[TRAIN])))
    server.push(multi(gpu(0, utilizationGpu=60, processes=[RENDER, NOTEBOOK])), device="rig-2")
    server.wait_past_last_push(1)
    server.push(multi(gpu(0, utilizationGpu=90, processes=[TRAIN]), gpu(1, utilizationGpu=90, processes=[TRAIN])))
    server.push(multi(gpu(0, utilizationGpu=60, processes=[RENDER])), device="rig-2")  # the notebook exited
    jobs_written(server, 3, ended=1)  # not only written: the second pushes' end of the notebook too
    page.goto(server.url + "/jobs")
    rows = page.locator("#jobs tbody tr")
    expect(rows).to_have_count(3)
    assert sorted(page.locator("#jobs tbody td.where").all_text_contents()) == ["rig-1:0,1", "rig-2:0", "rig-2:0"]
    assert set(page.locator("#jobs tbody td.command").all_text_contents()) == {
        "python3 train.py", "blender scene.blend", "python3 notebook.py"}
    notebook = rows.filter(has_text="python3 notebook.py")
    expect(notebook.locator("td.state")).to_have_text("exited")
    expect(rows.filter(has_text="python3 train.py").locator("td.state")).to_have_text("running")
    # Sorting: a header's button, then the other way round on a second click; kept in the URL.
    page.locator('#jobs th button[data-sort="user"]').click()
    expect(page.locator("#jobs tbody td:nth-child(2)")).to_have_text(["alice", "alice", "bob"])
    expect(page.locator('#jobs th:has(button[data-sort="user"])')).to_have_attribute("aria-sort", "descending")
    page.locator('#jobs th button[data-sort="user"]').click()
    expect(page.locator("#jobs tbody td:nth-child(2)")).to_have_text(["bob", "alice", "alice"])
    assert page.url.endswith("/jobs?sort=-user")
    # The search narrows both tables; "running now" only the running jobs.
    page.locator("#job-search").fill("notebook")
    expect(rows).to_have_count(1)
    page.locator("#job-search").fill("")
    page.locator("#running-only").click()
    expect(rows).to_have_count(2)
    expect(page.locator("#jobs-csv")).to_have_attribute("href", re.compile(r"^api/jobs\.csv\?from=\d+&running=1$"))
    # Usage: alice's two jobs and bob's one, then per PC.
    expect(page.locator("#usage tbody td:first-child")).to_have_text(["alice", "bob"])
    expect(page.locator("#usage tbody tr").first.locator("td").nth(1)).to_have_text("2")
    page.locator('[data-by="device"]').click()
    expect(page.locator("#usage-key-head")).to_have_text("PC")
    expect(page.locator("#usage tbody td:first-child")).to_have_text(["rig-1", "rig-2"])
    expect(page.locator("#usage-csv")).to_have_attribute("href", re.compile(r"by=device"))
    csv = requests.get(server.url + "/" + page.locator("#usage-csv").get_attribute("href"), timeout=5)
    assert csv.ok and "rig-1" in csv.text
    assert page.console_errors == []


def test_pushed_strings_on_the_jobs_page_stay_text(server, page):
    evil = '<img src=x onerror="window.pwned=1">'
    server.push(multi(gpu(0, processes=[{"pid": 1, "name": "x", "command": evil, "user": evil, "memoryUsed": 1}])))
    jobs_written(server, 1)
    page.goto(server.url + "/jobs")
    expect(page.locator("#jobs tbody td.command")).to_have_text(evil)
    assert page.locator("main img").count() == 0 and page.evaluate("window.pwned") is None
