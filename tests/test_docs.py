"""The docs: README.md is a short front door, docs/ builds with mkdocs --strict, every page is in the
nav, the README's links into docs/ land on a page and heading, and every `jneox COMMAND --flag` the
docs show is a flag of that command's parser (so a renamed or removed option cannot stay documented)."""
import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jneox.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_LINES = 250

# a shell word that ends one command: what follows it is not an option of the jneox command before it
SHELL_BREAKS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>", "2>&1", "#"}
FLAG = re.compile(r"^(--[A-Za-z][\w-]*|-[A-Za-z])$")


def _mkdocs_config() -> dict:
    # mkdocs.yml may use python tags (material's extensions do); nothing here needs them
    class Loader(yaml.SafeLoader):
        pass
    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    return yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=Loader)


def _nav_files(nav) -> list[str]:
    out = []
    for item in nav:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            for value in item.values():
                out.extend(_nav_files(value) if isinstance(value, list) else [value])
    return out


def _subcommand_options() -> dict[str, set[str]]:
    parser = build_parser()
    commands = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                commands[name] = {opt for a in sub._actions for opt in a.option_strings}
    assert commands, "jneox's parser has no subcommands"
    return commands


def _markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _command_lines(path: Path):
    """(line number, text) of every piece of shell the file shows: each line of a fenced code block,
    joined with the lines its trailing backslashes continue, and each inline code span outside them."""
    lines = path.read_text(encoding="utf-8").split("\n")
    in_block = False
    pending, pending_start = "", 0
    for number, line in enumerate(lines, start=1):
        if line.lstrip().startswith(("```", "~~~")):
            in_block = not in_block
            pending = ""
            continue
        if in_block:
            if not pending:
                pending_start = number
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            yield pending_start, pending + line
            pending = ""
        else:
            for span in re.findall(r"`([^`]+)`", line):
                yield number, span


def _jneox_invocations(text: str):
    """(subcommand, [words after it up to the end of that command]) for every `jneox SUB` in text."""
    try:
        words = shlex.split(text, comments=False, posix=True)
    except ValueError:  # an unbalanced quote in prose: fall back to whitespace
        words = text.split()
    for i, word in enumerate(words):
        if word == "jneox" or word.endswith("/jneox"):
            if i + 1 < len(words):
                rest = []
                for w in words[i + 2:]:
                    if w in SHELL_BREAKS or w.startswith("#"):
                        break
                    rest.append(w)
                yield words[i + 1], rest


def _flag_problems(path: Path, commands: dict[str, set[str]]) -> list[str]:
    label = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    problems = []
    for number, text in _command_lines(path):
        for sub, words in _jneox_invocations(text):
            if sub not in commands:
                continue  # `jneox.load`, `jneox COMMAND`, prose: not an invocation of a subcommand
            for word in words:
                flag = word.strip("[]()").split("=", 1)[0]
                if FLAG.match(flag) and flag not in commands[sub]:
                    problems.append(f"{label}:{number}: `jneox {sub}` has no option {flag}")
    return problems


def _anchors(page: Path) -> set[str]:
    # the heading ids mkdocs gives (Python-Markdown's toc extension; markdown comes with mkdocs)
    slugify = pytest.importorskip("markdown.extensions.toc", reason="mkdocs is in the test extra").slugify
    anchors, in_block = set(), False
    for line in page.read_text(encoding="utf-8").split("\n"):
        if line.lstrip().startswith(("```", "~~~")):
            in_block = not in_block
        elif not in_block and (m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            anchors.add(slugify(m.group(1).replace("`", ""), "-"))
    return anchors


def test_readme_is_a_short_front_door():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; the rest belongs in docs/"
    assert "make test" in README.read_text(encoding="utf-8"), "README.md must show the test command CI runs"


def test_every_docs_page_is_in_the_nav():
    config = _mkdocs_config()
    assert config.get("docs_dir", "docs") == "docs"
    nav = set(_nav_files(config["nav"]))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages - nav == set(), f"pages missing from mkdocs.yml's nav: {sorted(pages - nav)}"
    assert nav - pages == set(), f"nav entries without a page: {sorted(nav - pages)}"


def test_mkdocs_builds_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is in the test extra: pip install -e '.[test]'")
    pytest.importorskip("material", reason="mkdocs-material is in the test extra: pip install -e '.[test]'")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                             str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()


def test_readme_links_into_docs_resolve():
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [link for link in links if not re.match(r"^[a-z]+:", link)]
    assert any(link.startswith("docs/") for link in local), "README.md links to no docs page"
    problems = []
    for link in local:
        target, _, anchor = link.partition("#")
        path = (ROOT / target) if target else README
        if not path.exists():
            problems.append(f"README.md: {link}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            problems.append(f"README.md: {link}: {target or 'README.md'} has no heading #{anchor}")
    assert problems == [], "\n".join(problems)


def test_documented_flags_exist():
    commands = _subcommand_options()
    problems = [p for path in _markdown_files() for p in _flag_problems(path, commands)]
    assert problems == [], "\n".join(problems)


def test_flag_check_catches_a_flag_the_command_lacks(tmp_path):
    # the check above must be able to fail: a made-up flag, one split over a continued line, and a
    # real flag of another command are each reported with their line
    page = tmp_path / "page.md"
    page.write_text("intro `jneox chat --no-such-flag`\n\n```bash\njneox generate --model DIR \\\n"
                    "    --temperature 0 --bogus-option 3   # comment --also-ignored\n"
                    "jneox chat --out DIR | grep --not-jneox\n```\n", encoding="utf-8")
    commands = _subcommand_options()
    assert _flag_problems(page, commands) == ["page.md:1: `jneox chat` has no option --no-such-flag",
                                              "page.md:4: `jneox generate` has no option --bogus-option",
                                              "page.md:6: `jneox chat` has no option --out"]
