"""The README stays true to the code: every option documented, CI runs the README's test command."""
import os
import re

from main import build_app_parser, build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def test_readme_documents_every_option():
    readme = read("README.md")
    for parser in (build_parser(), build_app_parser()):  # main.py's and app.py's
        options = [o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
        missing = [o for o in options if f"`{o}`" not in readme]
        assert not missing, f"options of {parser.prog} missing from README.md: {missing}"


def test_readme_states_every_help_text():
    """The options tables say what --help says (main.py's and app.py's own options)."""
    readme = read("README.md")
    for action in build_parser()._actions + build_app_parser()._actions:
        if action.help and action.option_strings != ["-h", "--help"]:
            assert action.help.replace("%%", "%") in readme, action.option_strings


def test_ci_runs_exactly_the_readme_test_command():
    quickstart = re.findall(r"^(python -m pip install .*?)\s+#", read("README.md"), flags=re.M)
    test_command = [c for c in quickstart if "pytest" in c]
    assert len(test_command) == 1, quickstart
    assert test_command[0].strip() in read(".ci/run").splitlines()
