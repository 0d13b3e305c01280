"""The docs cannot rot: every command line shown in README.md and docs/ names a subcommand, module, script
and flags that exist (checked through each program's own flag definitions, not by running it), every
`configs/X.py:variant` and `--config.key` resolves, and every linked file and image exists."""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import re
import shlex

import pytest
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DOCS = glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)
PAGES = sorted(["README.md", "BENCHMARKS.md", "SCALING.md"] + [os.path.relpath(p, ROOT) for p in _DOCS])
_STARTS = ("dalle2-jax ", "python -m ", "python3 -m ", "python launch/", "launch/", "pytest")


def _code(text: str) -> list[str]:
    """The text of fenced code blocks (continuation lines joined) and of inline code spans. A command whose
    next line is an `error: ...` line shows a mistake on purpose and is left out."""
    out = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        lines = block.replace("\\\n", " ").splitlines()
        out += [line for line, after in zip(lines, lines[1:] + [""]) if not after.startswith("error:")]
    prose = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    out += re.findall(r"`([^`\n]+)`", prose)
    return out


def _commands(line: str) -> list[list[str]]:
    """The commands in one line of shell: split at && || | ; and comments, env assignments dropped."""
    line = line.split(" #")[0].strip()
    if line.startswith("$ "):
        line = line[2:]
    cmds = []
    for part in re.split(r"\s*(?:&&|\|\||\||;)\s*", line):
        try:
            words = shlex.split(part)
        except ValueError:
            words = part.split()
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
            words = words[1:]
        if words and words[0] in ("nohup", "time", "srun", "exec"):
            words = words[1:]
        text = " ".join(words)
        if text.startswith(_STARTS) and not text.startswith("python -m venv"):
            cmds.append(words)
    return cmds


def _all_commands() -> list[tuple[str, list[str]]]:
    found = []
    for page in PAGES:
        with open(os.path.join(ROOT, page)) as f:
            for line in _code(f.read()):
                found += [(page, c) for c in _commands(line)]
    return found


_CACHE: dict = {}


def _flag_values(module: str, func: str = "run", prefix: list[str] | None = None) -> flags.FlagValues:
    """The FlagValues a program parses, taken from the define function it hands to cli_util.run_program."""
    key = (module, func, tuple(prefix or ()))
    if key not in _CACHE:
        from dalle2_jax import cli_util

        mod = importlib.import_module(module)
        seen = {}

        def capture(doc, define, main, argv=None, **kw):
            seen["define"] = define

        saved = mod.run_program
        mod.run_program = capture
        try:
            getattr(mod, func)(list(prefix or ["x"]))
        finally:
            mod.run_program = saved
        fv = flags.FlagValues()
        seen["define"](fv)
        flags.DEFINE_bool("debug", False, "", flag_values=fv)  # added by run_program
        _CACHE[key] = (fv, cli_util)
    return _CACHE[key]


def _program(words: list[str]):
    """(FlagValues, the arguments after the program name) of a dalle2-jax or python -m command, else None."""
    from dalle2_jax.cli import COMMANDS

    if words[0] == "dalle2-jax":
        if len(words) < 2 or words[1].startswith(("-", "<")):
            return None  # `dalle2-jax --help`, `dalle2-jax <command> --help`
        assert words[1] in COMMANDS, f"unknown subcommand {words[1]!r}"
        module, _, func = COMMANDS[words[1]][0].partition(":")
        return _flag_values(module, func or "run"), words[2:]
    if words[0] in ("python", "python3") and words[1] == "-m":
        module = words[2]
        assert importlib.util.find_spec(module) is not None, f"no module {module}"
        if module == "dalle2_jax.generate":
            method = words[3] if len(words) > 3 and not words[3].startswith("-") else "generate"
            return _flag_values(module, f"run_{method}"), words[4:]
        mod = importlib.import_module(module)
        if module.startswith("dalle2_jax") and hasattr(mod, "run") and hasattr(mod, "run_program"):
            return _flag_values(module), words[3:]
        return None
    if words[0] in ("python", "python3") and words[1] == "launch/aot_compile.py":
        return _flag_values("dalle2_jax.tools.aot_compile"), words[2:]
    return None


def _check_flags(fv: flags.FlagValues, cli_util, args: list[str]) -> None:
    for a in args:
        m = re.match(r"^--?([A-Za-z_][\w.]*)", a)
        if not m or a.startswith("---"):
            continue
        name = m.group(1)
        if "." in name:
            continue  # --config.key: checked below with its config
        ok = name in fv or (name.startswith("no") and name[2:] in fv and fv[name[2:]].boolean)
        assert ok, f"no flag --{name}"
    for name in cli_util._config_flag_names(fv):
        value = cli_util._flag_value(args, name)
        if value is not None and ".py" not in value:
            return  # --config FILE, --config ...: a placeholder
    mistake = cli_util.check_config_args(fv, args)
    assert mistake is None, mistake


def test_the_docs_show_commands():
    cmds = _all_commands()
    pages = {p for p, _ in cmds}
    assert len(cmds) > 50 and "README.md" in pages and "docs/inference.md" in pages, (len(cmds), pages)


@pytest.mark.parametrize("page", PAGES)
def test_every_command_exists(page):
    os.chdir(ROOT)
    problems = []
    for where, words in _all_commands():
        if where != page:
            continue
        try:
            if words[0].startswith("launch/"):
                assert os.path.exists(words[0]), f"no script {words[0]}"
                continue
            if words[0] == "pytest":
                for w in words[1:]:
                    if w.startswith("tests/"):
                        assert os.path.exists(w.split("::")[0]), f"no test file {w}"
                continue
            prog = _program(words)
            if prog is not None:
                (fv, cli_util), args = prog
                _check_flags(fv, cli_util, args)
        except AssertionError as e:
            problems.append(f"{' '.join(words)[:160]}: {e}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES)
def test_every_config_variant_resolves(page):
    os.chdir(ROOT)
    with open(os.path.join(ROOT, page)) as f:
        text = f.read()
    problems = []
    for path, variant in sorted(set(re.findall(r"(configs/\w+\.py):([\w.-]+)", text))):
        if variant.isupper():
            continue  # a placeholder (VARIANT)
        spec = importlib.util.spec_from_file_location("_docs_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        try:
            module.get_config(variant)
        except Exception as e:  # noqa: BLE001 - any failure is a broken reference
            problems.append(f"{path}:{variant}: {e}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES)
def test_every_link_and_image_exists(page):
    with open(os.path.join(ROOT, page)) as f:
        text = f.read()
    base = os.path.dirname(os.path.join(ROOT, page))
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+://", target) or target.startswith(("#", "mailto:")):
            continue
        path = target.split("#")[0]
        if path and not os.path.exists(os.path.join(base, path)):
            missing.append(target)
    assert not missing, missing
