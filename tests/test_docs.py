"""The docs stay true to the code: every option documented in docs/options.md with its --help text and default,
CI runs the README's test command, every relative link resolves."""
import os
import re

from app import build_parser as build_app_parser
from main import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


OPTIONS_PAGE = os.path.join("docs", "options.md")  # the option tables; the README links to it


def test_options_page_documents_every_option():
    page = read(OPTIONS_PAGE)
    for parser in (build_parser(), build_app_parser()):  # main.py's and app.py's
        options = [o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
        missing = [o for o in options if f"`{o}`" not in page]
        assert not missing, f"options of {parser.prog} missing from {OPTIONS_PAGE}: {missing}"


def test_readme_links_the_options_page():
    assert f"]({OPTIONS_PAGE.replace(os.sep, '/')}" in read("README.md")


def test_options_page_states_every_help_text():
    """The options tables say what --help says (main.py's and app.py's own options)."""
    page = read(OPTIONS_PAGE)
    for action in build_parser()._actions + build_app_parser()._actions:
        if action.help and action.option_strings != ["-h", "--help"]:
            assert action.help.replace("%%", "%") in page, action.option_strings


def test_ci_runs_exactly_the_readme_test_command():
    quickstart = re.findall(r"^(python -m pip install .*?)\s+#", read("README.md"), flags=re.M)
    test_command = [c for c in quickstart if "pytest" in c]
    assert len(test_command) == 1, quickstart
    assert test_command[0].strip() in read(".ci/run").splitlines()


# [text](target) and ![alt](target), with an optional "title"; targets with a scheme (https:) are not ours.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def heading_anchors(markdown):
    """The anchors GitHub gives a file's headings: lower case, punctuation dropped, spaces as hyphens."""
    anchors = set()
    for heading in re.findall(r"^#+\s+(.*?)\s*$", markdown, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_every_relative_link_and_image_in_the_docs_resolves_inside_the_repository():
    documents = ["README.md"] + sorted(os.path.join("docs", n) for n in os.listdir(os.path.join(ROOT, "docs"))
                                       if n.endswith(".md"))
    broken, checked = [], 0
    for doc in documents:
        for target in LINK.findall(read(doc)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I):
                continue
            path, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), path)) if path else \
                os.path.join(ROOT, doc)
            checked += 1
            if os.path.commonpath([resolved, ROOT]) != ROOT or not os.path.exists(resolved):
                broken.append(f"{doc}: {target} (no such file in the repository)")
            elif anchor and resolved.endswith(".md") and anchor not in heading_anchors(read(resolved)):
                broken.append(f"{doc}: {target} (no heading #{anchor})")
    assert checked > 10  # the pattern finds the links at all
    assert not broken, "\n".join(broken)


def test_option_tables_show_the_parsers_defaults():
    """Each option row of docs/options.md shows what --help shows: the default, unless it is None or False."""
    rows = re.findall(r"^\| (`--[^|]*?) \| ([^|]*?) \| [^|]*\|$", read(OPTIONS_PAGE), flags=re.M)
    shown = {}
    for names, default in rows:  # main.py's tables come first; app.py's rows for the options it shares follow
        shown.setdefault(names.split("`")[1], default.strip().strip("`"))
    assert len(shown) > 40
    wrong = []
    for action in build_parser()._actions:
        name = next((o for o in action.option_strings if o in shown), None)
        if name is None:
            continue
        expected = "" if action.default is None or action.default is False else str(action.default)
        if shown[name] != expected:
            wrong.append(f"{name}: {OPTIONS_PAGE} shows {shown[name]!r}, the parser's default is {expected!r}")
    assert not wrong, "\n".join(wrong)
