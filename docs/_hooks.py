"""MkDocs hook: the API reference is rendered from docstrings, so a public
name without one, or an argument its docstring leaves out, is a build
warning (an error under `mkdocs build --strict`)."""

import pathlib
import re

import griffe
from mkdocs.plugins import get_plugin_logger

log = get_plugin_logger("bnlayers-docstrings")

# Where the documented arguments of a callable are listed: Google-style
# "Args:" of the function, or of the class for its constructor.
_ARGUMENT_SECTIONS = (griffe.DocstringSectionKind.parameters,)


def _documented(docstring):
    names = set()
    for section in docstring.parse("google", warn_missing_types=False):
        if section.kind in _ARGUMENT_SECTIONS:
            names.update(p.name.lstrip("*") for p in section.value)
    return names


def _check(path, obj):
    if not obj.docstring or not obj.docstring.value.strip():
        log.warning(f"{path} has no docstring")
        return
    target = obj
    if obj.is_class:
        target = obj.members.get("__init__")
        if target is None:
            return
    if not (target.is_function and hasattr(target, "parameters")):
        return
    wanted = {
        p.name for p in target.parameters if p.name not in ("self", "cls")
    }
    missing = sorted(wanted - _documented(obj.docstring))
    if missing:
        log.warning(
            f"{path}: the docstring's Args leave out {', '.join(missing)}"
        )


def on_pre_build(config, **kwargs):
    root = pathlib.Path(config.config_file_path).parent
    package = griffe.load(
        "bnlayers", search_paths=[str(root)], resolve_aliases=True
    )
    names = [str(name) for name in package.exports or ()]
    if not names:
        log.warning("bnlayers has no __all__ to check")
    for name in names:
        if name.startswith("__"):
            continue
        _check(f"bnlayers.{name}", package[name])
    # Public classes of the tools that a saved model may hold.
    for path in ("bnlayers.tools.ChannelAffine",):
        try:
            obj = package[path.removeprefix("bnlayers.")]
        except KeyError:
            log.warning(f"{path} is documented but not found")
            continue
        _check(path, obj)


# Repository paths quoted in the text, `tests/test_parity.py` or
# `examples/benchmark.py --out bench` (the path is the first word), that are
# not already a link's text.
_PATH_MENTION = re.compile(
    r"(?<!\[)`((?:tests|examples|docs|bnlayers|\.ci|\.github)/[\w./-]*\w)"
    r"((?: [^`\n]*)?)`(?!\]\()"
)
_FENCE = re.compile(r"^(```|~~~)", re.M)


def on_page_markdown(markdown, page, config, **kwargs):
    """With `repo_url` set, a quoted path to a file or folder of the
    repository links to it there."""
    repo = config.get("repo_url")
    if not repo:
        return markdown
    root = pathlib.Path(config.config_file_path).parent
    base = repo.rstrip("/") + "/blob/main/"

    def link(match):
        path = match.group(1)
        if not (root / path).exists():
            return match.group(0)
        return f"[{match.group(0)}]({base}{path})"

    # Fenced code blocks (every other fence) stay as they are.
    parts = _FENCE.split(markdown)
    out, in_code, i = [], False, 0
    while i < len(parts):
        text = parts[i]
        if i + 1 < len(parts):
            fence = parts[i + 1]
            out.append(text if in_code else _PATH_MENTION.sub(link, text))
            out.append(fence)
            in_code = not in_code
            i += 2
        else:
            out.append(text if in_code else _PATH_MENTION.sub(link, text))
            i += 1
    return "".join(out)
