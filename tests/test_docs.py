"""The README stays a five-minute read, and every relative link in it and in docs/ leads somewhere."""
import re

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE_SPAN = re.compile(r"(`+).+?\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)


def prose(markdown):
    """Return the Markdown with fenced blocks and code spans blanked out: links there are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", markdown))


def slug(heading):
    """Return GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(markdown):
    """Return every heading anchor of a page, the second of a name as `name-1` as GitHub does."""
    seen = {}
    for heading in HEADING.findall(FENCE.sub("", markdown)):
        name = slug(heading)
        seen[name] = seen.get(name, -1) + 1
        yield f"{name}-{seen[name]}" if seen[name] else name


def links(page):
    """Return the target of every link and image on a Markdown page, outside code."""
    return LINK.findall(prose(page.read_text()))


def broken_links(page, root=ROOT):
    """Return each relative link on `page` whose file or `#anchor` does not exist, with why."""
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z+.-]*:", target):  # https:, mailto:: not ours to check
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{page.relative_to(root)}: {target} (no such file)")
        elif anchor and (linked.suffix != ".md" or anchor not in set(anchors(linked.read_text()))):
            broken.append(f"{page.relative_to(root)}: {target} (no such heading)")
    return broken


def test_slugs_are_githubs():
    assert slug("Devices fixed in `.env` (the earlier way)") == "devices-fixed-in-env-the-earlier-way"
    assert slug("Scale out: the Redis hop and two workers") == "scale-out-the-redis-hop-and-two-workers"
    assert slug("Start the agent at boot on Linux (systemd)") == "start-the-agent-at-boot-on-linux-systemd"
    assert list(anchors("## Alerts\n```sh\n# not a heading\n```\n## Alerts\n")) == ["alerts", "alerts-1"]


def test_a_missing_file_or_heading_is_reported(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## Some part\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#some-part) [gone](other.md#no-part) ![img](missing.png) "
                    "[web](https://example.com/#x) `[code](nowhere.md)`\n\n## Here\n[self](#here) [not](#there)\n")
    assert broken_links(page, root=tmp_path) == ["page.md: other.md#no-part (no such heading)",
                                                 "page.md: missing.png (no such file)",
                                                 "page.md: #there (no such heading)"]


def test_every_relative_link_and_anchor_in_the_readme_and_docs_resolves():
    broken = [line for page in PAGES for line in broken_links(page)]
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    # Issue 31: the README lost most of its 1,240 lines to docs/; each page must stay one click away.
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(ROOT / "README.md")}
    assert [page.name for page in PAGES[1:] if page.resolve() not in linked] == []


def test_readme_is_read_in_five_minutes():
    # Issue 31: a new user needed the README's line 726 to change the port.
    assert len((ROOT / "README.md").read_text().splitlines()) < 350
