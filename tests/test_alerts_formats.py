"""What each receiver is sent for an alert: Alertmanager webhook, ntfy, Discord, Slack."""
import json
import re

import pytest

from gpustats.alerts.formats import message, parse_destinations

HOT = {"alertname": "GpuHot", "status": "firing", "device": "render-box", "gpu": 0,
       "summary": "render-box:0 is at 91 °C (threshold 85 °C) for 2 min", "value": 91, "severity": "warning",
       "startsAt": "2026-11-24T04:10:00Z", "endsAt": None, "fingerprint": "619cd67eb62c8616"}
HOT_RESOLVED = dict(HOT, status="resolved", endsAt="2026-11-24T04:17:00Z")
OFFLINE = {"alertname": "DeviceOffline", "status": "firing", "device": "render-box",
           "summary": "render-box is offline", "value": None, "severity": "critical",
           "startsAt": "2026-11-24T04:10:00Z", "endsAt": None, "fingerprint": "0123456789abcdef"}
JOB_DONE = dict(HOT, alertname="GpuJobDone", severity="info", summary="render-box:0 finished a job", value=None)
SITE = "https://gpustats.example.com"
WEBHOOK, NTFY, DISCORD, SLACK = parse_destinations(
    "https://am.example.com/hook, ntfy+https://ntfy.example.com/gpu-alerts,"
    "discord+https://discord.com/api/webhooks/1/TOKEN, slack+https://hooks.slack.com/services/T0/B0/SECRET")
CHAT = (NTFY, DISCORD, SLACK)


def body(destination, alert, external_url=SITE):
    return message(destination, alert, external_url)[2]


def test_webhook_gets_an_alertmanager_v4_message():
    url, headers, sent = message(WEBHOOK, HOT, SITE)
    labels = {"alertname": "GpuHot", "device": "render-box", "gpu": "0", "severity": "warning"}
    annotations = {"summary": HOT["summary"]}
    assert (url, headers) == ("https://am.example.com/hook", {"Content-Type": "application/json"})
    assert sent == {
        "version": "4", "groupKey": '{}:{alertname="GpuHot", device="render-box", gpu="0"}', "truncatedAlerts": 0,
        "status": "firing", "receiver": "gpustats",
        "groupLabels": {"alertname": "GpuHot", "device": "render-box", "gpu": "0"},
        "commonLabels": labels, "commonAnnotations": annotations, "externalURL": SITE,
        "alerts": [{"status": "firing", "labels": labels, "annotations": annotations,
                    "startsAt": "2026-11-24T04:10:00Z", "endsAt": "0001-01-01T00:00:00Z",
                    "generatorURL": SITE + "/", "fingerprint": "619cd67eb62c8616"}]}


def test_webhook_resolved_is_the_same_message_with_its_end():
    firing, resolved = body(WEBHOOK, HOT), body(WEBHOOK, HOT_RESOLVED)
    firing["status"] = firing["alerts"][0]["status"] = "resolved"
    firing["alerts"][0]["endsAt"] = "2026-11-24T04:17:00Z"
    assert resolved == firing


def test_webhook_reuses_the_alerts_fingerprint_and_has_no_links_without_an_external_url():
    sent = body(WEBHOOK, dict(HOT, fingerprint="ffffffffffffffff"), external_url="")
    assert sent["alerts"][0]["fingerprint"] == "ffffffffffffffff"
    assert sent["externalURL"] == sent["alerts"][0]["generatorURL"] == ""
    assert "click" not in body(NTFY, HOT, "") and "url" not in body(DISCORD, HOT, "")["embeds"][0]
    assert "dashboard" not in json.dumps(body(SLACK, HOT, ""))


def test_a_device_alert_names_no_gpu():
    sent = body(WEBHOOK, OFFLINE)
    assert sent["groupKey"] == '{}:{alertname="DeviceOffline", device="render-box"}'
    assert sent["groupLabels"] == {"alertname": "DeviceOffline", "device": "render-box"}
    assert sent["alerts"][0]["labels"] == {"alertname": "DeviceOffline", "device": "render-box",
                                           "severity": "critical"}
    assert body(NTFY, OFFLINE)["title"] == "[FIRING] DeviceOffline render-box"
    assert body(NTFY, OFFLINE)["message"] == "render-box is offline\nsince 2026-11-24T04:10:00Z"
    embed = body(DISCORD, OFFLINE)["embeds"][0]
    assert embed["title"] == "[FIRING] DeviceOffline render-box"
    assert embed["fields"] == [{"name": "Device", "value": "render-box", "inline": True},
                               {"name": "Severity", "value": "critical", "inline": True}]
    assert body(SLACK, OFFLINE)["blocks"][0]["text"]["text"] == "🔥 FIRING: DeviceOffline on render-box"


def test_ntfy_gets_json_at_the_root_with_title_priority_and_tags():
    url, headers, sent = message(NTFY, HOT, SITE)
    assert (url, headers) == ("https://ntfy.example.com/", {"Content-Type": "application/json"})
    assert sent == {"topic": "gpu-alerts", "title": "[FIRING] GpuHot render-box:0",
                    "message": HOT["summary"] + "\nvalue 91, since 2026-11-24T04:10:00Z",
                    "priority": 4, "tags": ["warning", "GpuHot"], "click": SITE + "/"}
    assert body(NTFY, dict(HOT, severity="critical"))["tags"][0] == "rotating_light"
    assert body(NTFY, HOT_RESOLVED) == {
        "topic": "gpu-alerts", "title": "[RESOLVED] GpuHot render-box:0",
        "message": HOT["summary"] + "\nresolved 2026-11-24T04:17:00Z (after 7 min)",
        "priority": 2, "tags": ["white_check_mark", "GpuHot"], "click": SITE + "/"}


def test_a_finished_job_is_good_news_on_ntfy():
    sent = body(NTFY, JOB_DONE)
    assert sent["priority"] == 3 and sent["tags"] == ["tada", "GpuJobDone"]


@pytest.mark.parametrize("entry, url, auth", [
    ("ntfy+https://ntfy.example.com/gpu", "https://ntfy.example.com/", None),
    ("ntfy+https://alice:s%40cret@ntfy.example.com/gpu", "https://ntfy.example.com/", "Basic YWxpY2U6c0BjcmV0"),
    ("ntfy+https://tk_abc123@ntfy.example.com/gpu", "https://ntfy.example.com/", "Bearer tk_abc123"),
    ("ntfy+https://:tk_abc123@ntfy.example.com/gpu", "https://ntfy.example.com/", "Bearer tk_abc123"),
    ("ntfy+http://10.0.0.5:8080/ntfy/gpu/", "http://10.0.0.5:8080/ntfy/", None),  # served under a subpath
])
def test_ntfy_posts_to_its_root_with_the_urls_credentials(entry, url, auth):
    (destination,) = parse_destinations(entry)
    sent_url, headers, sent = message(destination, HOT, "")
    assert (sent_url, headers.get("Authorization"), sent["topic"]) == (url, auth, "gpu")
    assert "alice" not in repr(destination) and "tk_" not in repr(destination) and "tk_" not in destination.label


def test_discord_gets_an_embed_that_waits_and_pings_nobody():
    url, _, sent = message(DISCORD, HOT, SITE)
    assert url == "https://discord.com/api/webhooks/1/TOKEN?wait=true"
    assert sent == {"username": "gpustats", "allowed_mentions": {"parse": []}, "embeds": [{
        "title": "[FIRING] GpuHot render-box:0", "url": SITE + "/",
        "description": "render\\-box:0 is at 91 °C \\(threshold 85 °C\\) for 2 min", "color": 10038562,
        "fields": [{"name": "Device", "value": "render-box", "inline": True},
                   {"name": "GPU", "value": "0", "inline": True}, {"name": "Value", "value": "91", "inline": True},
                   {"name": "Severity", "value": "warning", "inline": True}],
        "timestamp": "2026-11-24T04:10:00Z", "footer": {"text": "GpuHot · 619cd67eb62c8616"}}]}
    embed = body(DISCORD, HOT_RESOLVED)["embeds"][0]
    assert (embed["title"], embed["color"], embed["timestamp"]) == (
        "[RESOLVED] GpuHot render-box:0", 3066993, "2026-11-24T04:17:00Z")
    assert embed["description"].endswith("\nResolved after 7 min")


def test_discord_keeps_the_webhooks_own_query():
    (destination,) = parse_destinations("discord+https://discord.com/api/webhooks/1/T?thread_id=42&wait=false")
    assert destination.url == "https://discord.com/api/webhooks/1/T?thread_id=42&wait=true"


def test_discord_defuses_mentions_and_markdown_in_agent_text():
    summary = "@everyone @here <@123456789012345678> [prize](https://evil.example) **bold** `code`"
    description = body(DISCORD, dict(HOT, summary=summary))["embeds"][0]["description"]
    assert "@everyone" not in description and "@here" not in description and "<@1" not in description
    assert description.startswith("@\u200beveryone @\u200bhere <@\u200b123456789012345678\\>")
    assert "\\[prize\\]\\(https://evil.example\\) \\*\\*bold\\*\\* \\`code\\`" in description


def test_slack_gets_text_and_plain_blocks():
    url, _, sent = message(SLACK, HOT, SITE)
    assert url == "https://hooks.slack.com/services/T0/B0/SECRET"
    assert sent == {"text": "[FIRING] GpuHot render-box:0: " + HOT["summary"], "mrkdwn": False, "blocks": [
        {"type": "header", "text": {"type": "plain_text", "text": "🔥 FIRING: GpuHot on render-box:0"}},
        {"type": "section", "text": {"type": "plain_text", "text": HOT["summary"]}},
        {"type": "context", "elements": [
            {"type": "plain_text", "text": "value 91 · since 2026-11-24T04:10:00Z · 619cd67eb62c8616"},
            {"type": "mrkdwn", "text": f"<{SITE}/|dashboard>"}]}]}
    resolved = body(SLACK, HOT_RESOLVED)
    assert resolved["text"] == "[RESOLVED] GpuHot render-box:0 (after 7 min)"
    assert resolved["blocks"][0]["text"]["text"] == "✅ RESOLVED: GpuHot on render-box:0"
    assert resolved["blocks"][2]["elements"][0]["text"].startswith("resolved 2026-11-24T04:17:00Z")


def test_slack_escapes_its_control_characters_everywhere():
    sent = body(SLACK, dict(HOT, summary="<!channel> R&D <https://evil.example|click>"), "")
    escaped = "&lt;!channel&gt; R&amp;D &lt;https://evil.example|click&gt;"
    assert sent["text"].endswith(escaped) and sent["blocks"][1]["text"]["text"] == escaped
    assert "<" not in json.dumps(sent) and "&amp;amp;" not in json.dumps(sent)


def test_agent_text_loses_control_characters_and_bidi_overrides():
    summary = "rig\u202egnp.exe\x1b[31m red\r\nSubject: x\u0000"
    for destination in (WEBHOOK, *CHAT):
        text = json.dumps(body(destination, dict(HOT, summary=summary)), ensure_ascii=False)
        assert "\u202e" not in text and "\\u001b" not in text and "\\r" not in text and "\\u0000" not in text
        assert "Subject" in text and "\\nSubject" not in text


def test_a_huge_summary_is_cut_to_every_limit():
    huge = dict(HOT, summary="°C <*> " * 20_000)
    ntfy = body(NTFY, huge)["message"]
    assert len(ntfy.encode()) <= 4096 and ntfy.endswith("…\nvalue 91, since 2026-11-24T04:10:00Z")
    embed = body(DISCORD, huge)["embeds"][0]
    assert len(embed["description"]) <= 4096 and embed["description"].endswith("…")
    assert not embed["description"].endswith("\\…")  # never half an escape
    total = len(embed["title"]) + len(embed["description"]) + len(embed["footer"]["text"]) + sum(
        len(f["name"]) + len(f["value"]) for f in embed["fields"])
    assert total <= 6000 and all(f["value"] for f in embed["fields"])
    slack = body(SLACK, huge)
    section = slack["blocks"][1]["text"]["text"]
    assert len(section) <= 3000 and section.endswith("…")
    assert re.fullmatch(r"([^&]|&(amp|lt|gt);)*", section)  # never half an entity
    assert len(slack["text"]) <= 3000 and len(slack["blocks"][0]["text"]["text"]) <= 150


def test_long_names_are_cut_too():
    long = dict(HOT, device="r" * 2000, summary="")
    embed = body(DISCORD, long)["embeds"][0]
    assert len(embed["title"]) <= 256 and len(embed["fields"][0]["value"]) <= 1024
    assert embed["description"] == "—"  # Discord refuses an empty one
    assert len(body(SLACK, long)["blocks"][0]["text"]["text"]) <= 150
    assert body(SLACK, long)["blocks"][1]["text"]["text"] == "—"


def test_a_finished_jobs_resolution_goes_to_the_webhook_only():
    resolved = dict(JOB_DONE, status="resolved", endsAt="2026-11-24T04:10:00Z")
    assert [message(d, resolved, SITE) is None for d in (WEBHOOK, *CHAT)] == [False, True, True, True]
    assert all(message(d, JOB_DONE, SITE) is not None for d in (WEBHOOK, *CHAT))


def test_destinations_are_read_with_a_safe_label_and_a_stable_id():
    assert parse_destinations("") == () and parse_destinations(" , ") == ()
    assert [(d.kind, d.label) for d in (WEBHOOK, NTFY, DISCORD, SLACK)] == [
        ("webhook", "webhook https://am.example.com"), ("ntfy", "ntfy https://ntfy.example.com"),
        ("discord", "discord https://discord.com"), ("slack", "slack https://hooks.slack.com")]
    (again,) = parse_destinations(" slack+https://hooks.slack.com/services/T0/B0/SECRET ")
    assert again.id == SLACK.id and len({d.id for d in (WEBHOOK, NTFY, DISCORD, SLACK)}) == 4
    assert all("SECRET" not in d.id + d.label + repr(d) for d in (SLACK, again))
    (plain,) = parse_destinations("http://127.0.0.1:9093/api/hook?token=1")
    assert plain.url == "http://127.0.0.1:9093/api/hook?token=1" and plain.label == "webhook http://127.0.0.1:9093"


@pytest.mark.parametrize("raw, where, problem", [
    ("https://a.example/x, discord+https://discord.com/api/webhooks/1/SECRET?x=SECRET2",
     None, None),  # good: the control for the rest
    ("https://a.example/x, ftp://files.example/SECRET", "entry 2 (ftp://files.example/…)", "not a kind of URL"),
    ("user:SECRET@hooks.slack.com/services/x", "entry 1 (…)", "not a kind of URL"),
    ("discord+https:///api/webhooks/1/SECRET", "entry 1 (discord+https:///…)", "has no host"),
    ("ntfy+https://bob:SECRET@ntfy.example.com/", "entry 1 (ntfy+https://ntfy.example.com/…)", "needs a topic"),
    ("ntfy+https://ntfy.example.com/SECRET?x", None, None),
    ("slack+https://hooks.slack.com?SECRET", "entry 1 (slack+https://hooks.slack.com/…)", "has no webhook path"),
    ("https://a.example:SECRET/x", "entry 1 (https://a.example/…)", "port"),
    ("https://a.example/SECRET,https://a.example/SECRET", "entry 2 (https://a.example/…)", "the same as entry 1"),
])
def test_a_bad_entry_is_named_without_its_secrets(raw, where, problem):
    if problem is None:
        assert parse_destinations(raw)
        return
    with pytest.raises(ValueError) as error:
        parse_destinations(raw)
    assert str(error.value).startswith(where + ": ") and problem in str(error.value)
    assert "SECRET" not in str(error.value)


NAMED_JOB = dict(JOB_DONE, gpu=0, value=11520, summary=(
    "alice's python3 train.py on render-box:0 finished after 3 h 12 min, peak 61.2 GiB, mean 87 %"))
IDLE_HELD = dict(HOT, alertname="GpuIdleHeld", gpu=3, value=41062, fingerprint="0a1b2c3d4e5f6071",
                 summary="bob's python3 notebook.py holds 40.1 GiB on render-box:3 at 0 % for 30 min")
IDLE_HELD_RESOLVED = dict(IDLE_HELD, status="resolved", endsAt="2026-11-24T04:40:00Z",
                          summary="bob's python3 notebook.py let go of its memory on render-box:3")


@pytest.mark.parametrize("alert", [NAMED_JOB, IDLE_HELD, IDLE_HELD_RESOLVED], ids=["job", "held", "let-go"])
def test_the_job_alerts_carry_who_ran_what_in_every_format(alert):
    sent = {d.kind: json.dumps(body(d, alert), ensure_ascii=False) for d in (WEBHOOK, *CHAT)}
    assert body(WEBHOOK, alert)["alerts"][0]["labels"]["alertname"] == alert["alertname"]
    assert body(WEBHOOK, alert)["commonAnnotations"]["summary"] == alert["summary"]
    assert alert["summary"] in body(NTFY, alert)["message"]
    assert body(DISCORD, alert)["embeds"][0]["description"].startswith(alert["summary"].replace("-", "\\-"))
    assert body(SLACK, alert)["blocks"][1]["text"]["text"] == alert["summary"]
    assert all("bob's" in text or "alice's" in text for text in sent.values())


def test_memory_held_idle_is_a_quiet_warning_in_chat():
    assert body(NTFY, IDLE_HELD)["priority"] == 3 and body(NTFY, IDLE_HELD)["tags"] == ["zzz", "GpuIdleHeld"]
    assert body(SLACK, IDLE_HELD)["blocks"][0]["text"]["text"] == "💤 FIRING: GpuIdleHeld on render-box:3"
    assert body(NTFY, IDLE_HELD_RESOLVED)["tags"][0] == "white_check_mark"  # its resolution is news: it goes out


HOST_MEMORY = dict(OFFLINE, alertname="HostMemoryFull", severity="warning", value=97, fingerprint="1b2c3d4e5f607182",
                   summary="render-box's memory is 97 % used (993.3 of 1024.0 GiB), at or above 95 % for 2 min")
DISK_FULL = dict(OFFLINE, alertname="DiskFull", severity="warning", value=96, mount="/data_set*", fingerprint="2c3d4e5f60718293",
                 summary="render-box's disk /data_set* is 96 % full (983.0 of 1024.0 GiB), at or above 95 % for 2 min")


@pytest.mark.parametrize("alert", [HOST_MEMORY, DISK_FULL], ids=["memory", "disk"])
def test_the_host_alerts_name_the_pc_and_no_gpu_in_every_format(alert):
    labels = body(WEBHOOK, alert)["alerts"][0]["labels"]
    assert labels == {"alertname": alert["alertname"], "device": "render-box", "severity": "warning",
                      **({"mount": alert["mount"]} if "mount" in alert else {})}
    assert body(WEBHOOK, alert)["commonAnnotations"]["summary"] == alert["summary"]
    assert alert["summary"] in body(NTFY, alert)["message"] and body(NTFY, alert)["tags"] == ["warning", alert["alertname"]]
    assert body(NTFY, alert)["title"] == f"[FIRING] {alert['alertname']} render-box"
    embed = body(DISCORD, alert)["embeds"][0]
    assert "GPU" not in [f["name"] for f in embed["fields"]] and embed["description"].startswith("render\\-box's")
    assert body(SLACK, alert)["blocks"][0]["text"]["text"] == f"🔥 FIRING: {alert['alertname']} on render-box"
    assert body(SLACK, alert)["blocks"][1]["text"]["text"] == alert["summary"]


def test_a_full_disks_mount_is_a_discord_field_with_its_markdown_defused():
    fields = {f["name"]: f["value"] for f in body(DISCORD, DISK_FULL)["embeds"][0]["fields"]}
    assert fields["Mount"] == "/data\\_set\\*" and fields["Device"] == "render-box"
