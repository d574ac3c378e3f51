"""How the entry points talk: each flag's help with its default, and paths in results as any clone reads them."""
import argparse
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions keep their line breaks; each flag ends with `(default: X)`, `(default: off)` for a switch,
    unless its help already says what the default is (a computed one: "default: the model size's width")."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        if ("default" in help_text.lower() or action.default is argparse.SUPPRESS or action.required
                or not action.option_strings):
            return help_text
        if action.nargs == 0 and action.default is False:  # store_true
            return f"{help_text} (default: off)"
        if action.default is None:
            return f"{help_text} (default: none)"
        return f"{help_text} (default: %(default)s)"


def shown_path(path):
    """`path` as results files record it: relative to the repository when inside it, `~/...` under the home
    folder, else absolute (a temporary folder), so that a results file names no one machine's layout."""
    if path is None:
        return None
    full = os.path.abspath(os.fspath(path))
    if os.path.commonpath([full, REPO_ROOT]) == REPO_ROOT:
        return os.path.relpath(full, REPO_ROOT)
    home = os.path.expanduser("~")
    if home not in ("", "/") and os.path.commonpath([full, home]) == home:
        return os.path.join("~", os.path.relpath(full, home))
    return full
