"""The docs stay navigable and inside the repository.

For README.md, CHANGELOG.md and docs/*.md:

- every link (inline, reference, HTML `href`/`src`) is a relative path to a
  file or folder of this repository, and an anchor names a heading of the
  markdown file it points into (GitHub's slugs);
- no URL leads outside: prose has no `http(s)://` or `www.` at all (GitHub
  would link it) and no autolink; code blocks and code spans may show
  loopback URLs (`http://127.0.0.1:8000/...`), which are commands, not links;
- every page in docs/ is reachable from the README, which names `make test`
  as the test command (`.ci/run` runs "the README's test command");
- the sample alert rules in docs/operating.md parse, and use only metrics
  that page documents.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^ *(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)", re.DOTALL)
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s()]*)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)"
)
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(\S+)", re.MULTILINE)
HTML_TARGET = re.compile(r"\b(?:href|src)\s*=\s*[\"']([^\"']*)[\"']", re.IGNORECASE)
AUTOLINK = re.compile(r"<([a-zA-Z][a-zA-Z0-9+.-]{1,31}:[^<>\s]*)>")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
BARE_URL = re.compile(r"https?://|\bwww\.[a-z0-9-]+\.", re.IGNORECASE)
URL_HOST = re.compile(r"https?://(\[[^\]]*\]|[^/\s:'\"`)>\]]+)", re.IGNORECASE)
LOOPBACK = re.compile(r"^(localhost|127(\.\d{1,3}){3}|\[::1\])$", re.IGNORECASE)


@dataclass(frozen=True)
class Page:
    """A markdown file split into what GitHub renders as prose and as code."""

    path: Path
    prose: str  # code blocks blanked, code spans replaced by a placeholder
    code: list[str]  # fenced blocks and code spans
    headings: list[str]  # ATX headings outside code, as written

    @classmethod
    def read(cls, path: Path) -> Page:
        return cls.parse(path, path.read_text(encoding="utf-8"))

    @classmethod
    def parse(cls, path: Path, text: str) -> Page:
        prose_lines: list[str] = []
        code: list[str] = []
        headings: list[str] = []
        fence: str | None = None
        block: list[str] = []
        for line in text.splitlines():
            opener = FENCE.match(line)
            if fence is None and opener:
                fence = opener.group(1)
                block = []
                prose_lines.append("")
            elif fence is not None:
                if line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(
                    fence[0]
                ):
                    fence = None
                    code.append("\n".join(block))
                else:
                    block.append(line)
                prose_lines.append("")
            else:
                prose_lines.append(line)
                if heading := HEADING.match(line):
                    headings.append(heading.group(2))
        if fence is not None:
            code.append("\n".join(block))  # an unclosed fence runs to the end, as on GitHub
        prose = "\n".join(prose_lines)
        code.extend(span.group(2) for span in CODE_SPAN.finditer(prose))
        return cls(path, CODE_SPAN.sub("code", prose), code, headings)

    def targets(self) -> list[str]:
        inline = [m.group(1).strip("<>") for m in INLINE_LINK.finditer(self.prose)]
        return [
            *inline,
            *REFERENCE.findall(self.prose),
            *HTML_TARGET.findall(self.prose),
            *AUTOLINK.findall(self.prose),
        ]

    def anchors(self) -> set[str]:
        return anchors_of(self.headings)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors_of(headings: list[str]) -> set[str]:
    """Every heading's anchor; a repeated one gets -1, -2, ... as on GitHub."""
    seen: Counter[str] = Counter()
    anchors = set()
    for heading in headings:
        base = slug(heading)
        anchors.add(f"{base}-{seen[base]}" if seen[base] else base)
        seen[base] += 1
    return anchors


def link_problems(page: Page, root: Path = ROOT) -> list[str]:
    """What is wrong with each link target of `page`: one line per bad link."""
    problems = []
    for target in page.targets():
        where = f"{page.path.relative_to(root)}: ({target})"
        if not target:
            problems.append(f"{where} is empty")
            continue
        if SCHEME.match(target) or target.startswith("/"):
            problems.append(f"{where} points outside the repository: link a relative path")
            continue
        path_part, _, fragment = target.partition("#")
        if not path_part:  # an anchor in the page itself
            if unquote(fragment) not in page.anchors():
                problems.append(f"{where}: no heading with that anchor")
            continue
        dest = (page.path.parent / unquote(path_part)).resolve()
        if not dest.is_relative_to(root.resolve()):
            problems.append(f"{where} leaves the repository")
        elif not dest.exists():
            problems.append(f"{where}: no such file")
        elif fragment:
            if dest.suffix != ".md":
                problems.append(f"{where}: an anchor into a file that has no headings")
            elif unquote(fragment) not in Page.read(dest).anchors():
                problems.append(f"{where}: no heading with that anchor")
    return problems


def url_problems(page: Page, root: Path = ROOT) -> list[str]:
    name = page.path.relative_to(root)
    problems = [f"{name}: a URL in prose: {m.group(0)!r}" for m in BARE_URL.finditer(page.prose)]
    for snippet in page.code:
        for host in URL_HOST.findall(snippet):
            if not LOOPBACK.match(host):
                problems.append(f"{name}: a URL to {host} in code: only loopback ones may stay")
    return problems


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_leads_to_a_file_of_the_repository_and_a_heading_in_it(path: Path) -> None:
    assert link_problems(Page.read(path)) == []


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_url_leads_outside_the_repository(path: Path) -> None:
    assert url_problems(Page.read(path)) == []


def test_every_docs_page_is_reachable_from_the_readme() -> None:
    readme = Page.read(ROOT / "README.md")
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in readme.targets() if t[:1] != "#"}
    assert {p.resolve() for p in PAGES if p.parent.name == "docs"} <= linked


def test_the_readme_names_make_test_as_the_test_command() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    two_commands = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"^make test\b", two_commands, re.MULTILINE), "`.ci/run` runs `make test`"


def test_the_sample_alert_rules_use_only_documented_metrics() -> None:
    page = Page.read(ROOT / "docs" / "operating.md")
    (rules_text,) = [block for block in page.code if block.lstrip().startswith("groups:")]
    rules = [rule for group in yaml.safe_load(rules_text)["groups"] for rule in group["rules"]]
    assert rules and all({"alert", "expr"} <= set(rule) for rule in rules)
    text = page.path.read_text(encoding="utf-8")  # the metrics tables' first column
    documented = set(re.findall(r"^\| `(intentflow_\w+)(?:\{[^}]*\})?` \|", text, re.MULTILINE))
    assert len(documented) >= 12, documented
    used = {
        re.sub(r"_(bucket|sum|count)$", "", name)
        for rule in rules
        for name in re.findall(r"\bintentflow_\w+", rule["expr"])
    }
    assert used and used <= documented, used - documented


# -- the checker itself ---------------------------------------------------


def test_slugs_follow_github() -> None:
    assert slug("The bridge's answers") == "the-bridges-answers"
    assert slug("Replaying Stripe at its worst: `replay-duplicates`") == (
        "replaying-stripe-at-its-worst-replay-duplicates"
    )
    assert slug("Managed Kafka (MSK, Confluent Cloud, Strimzi with TLS)") == (
        "managed-kafka-msk-confluent-cloud-strimzi-with-tls"
    )
    assert slug("Runbook: a dead letter") == "runbook-a-dead-letter"
    assert anchors_of(["Consumer", "Consumer", "Bridge"]) == {"consumer", "consumer-1", "bridge"}


def test_the_checker_refuses_what_it_must(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other\n\n## A part\n")
    text = "\n".join(
        [
            "# Page",
            "[fine](docs/other.md#a-part) [self](#page) [no](#nowhere)",
            "`[not a link](https://x.example)`",
            "[outside](https://example.com/) [gone](docs/missing.md)",
            "[bad anchor](docs/other.md#nope)",
            "[up](../elsewhere.md) <https://example.com> see www.example.com",
            "```",
            "# not a heading",
            "curl http://127.0.0.1:8000/healthz https://example.org/x",
            "```",
        ]
    )
    page = Page.parse(tmp_path / "page.md", text)
    assert page.headings == ["Page"]
    problems = link_problems(page, tmp_path)
    assert [p.split(": (")[1].split(")")[0] for p in problems] == [
        "#nowhere",
        "https://example.com/",
        "docs/missing.md",
        "docs/other.md#nope",
        "../elsewhere.md",
        "https://example.com",
    ]
    urls = url_problems(page, tmp_path)
    assert len(urls) == 5, urls  # prose: 2 https:// and www.; code: x.example, example.org
    assert not any("127.0.0.1" in p for p in urls)


# A relative path written out, linked or not: `../shared/DESIGN.md`, ../notes.md.
RELATIVE_PATH = re.compile(r"(?<![\w./-])(?:\.\./)+[\w.-][\w./-]*")


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_path_written_in_a_page_leaves_the_repository(path: Path) -> None:
    """A path named in prose or code, not only a link, must not lead out of the clone: a
    reader has only the repository (the design once lived in `../shared/DESIGN.md`)."""
    text = path.read_text()
    outside = [
        found
        for found in RELATIVE_PATH.findall(text)
        if not (path.parent / found).resolve().is_relative_to(ROOT.resolve())
    ]
    assert outside == []


def test_the_code_cites_the_design_in_the_repository() -> None:
    """Code, migrations and tests cite docs/design.md, never a design outside the clone."""
    tracked = subprocess.run(
        ["git", "ls-files", "*.py", "*.sql", "*.md", "*.yaml", "Makefile"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    citing = [
        name
        for name in tracked
        if name != "tests/unit/test_docs.py"
        and ("DESIGN.md" in (text := (ROOT / name).read_text()) or "../shared/" in text)
    ]
    assert citing == []
    assert (ROOT / "docs" / "design.md").is_file()
