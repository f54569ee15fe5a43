"""Messages and help: flags show no value placeholder, closed sets are choices, `reconstruct` takes
every `views` option, help names only options its command has, and every `dp360 ...` command that
a message suggests exists with the options and values it names."""

from __future__ import annotations

import ast
import inspect
import io
import logging
import re
import textwrap
import tokenize
import warnings
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from cli.main import app

from ..conftest import REPO

WIDE = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}


def _root():
    return typer.main.get_command(app)


def _commands(command=None, path=()):
    """(path, command) for the app, every group and every command under it."""
    command = command or _root()
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _commands(sub, (*path, name))


def _options(command) -> dict[str, object]:
    """Every option string of a command (with --help) -> its parameter."""
    found = {"--help": None}
    for param in command.params:
        if param.param_type_name == "option":
            for name in (*param.opts, *param.secondary_opts):
                found[name] = param
    return found


def _arguments(command) -> list:
    return [param for param in command.params if param.param_type_name == "argument"]


def _choices(param) -> set[str] | None:
    """The allowed values of an enum-typed parameter (as strings), None for an open one."""
    descriptor = getattr(param, "type_descriptor", None)  # typer's own parameter types
    if descriptor is not None:
        choices = descriptor.choices if descriptor.is_choice else None
    else:  # click's
        choices = getattr(getattr(param, "type", None), "choices", None)
    return None if choices is None else {getattr(choice, "value", choice) for choice in choices}


def _help(*args: str):
    result = CliRunner().invoke(app, [*args, "--help"], env=WIDE)
    return result.exit_code, result.stdout


# --------------------------------------------------------------------------------------------
# Flags and choices in --help
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [path for path, _ in _commands()], ids=lambda path: " ".join(path) or "dp360")
def test_flags_show_no_value_placeholder(path):
    code, text = _help(*path)
    assert code == 0, text
    assert "<bool" not in text and "BOOLEAN" not in text, text
    command = dict(_commands())[path]
    flags = [param.opts for param in command.params if getattr(param, "is_flag", False)] + [["--help"]]
    for names in flags:  # a flag's row: its names, then straight its help text
        row = next(line for line in text.splitlines() if re.match(rf"^[│|*\s]*{re.escape(names[0])}(?![\w-])", line))
        after = row.split(names[0], 1)[1].replace(",", " ").split()
        after = after[1:] if after and after[0] in names else after
        assert after and not after[0].startswith(("<", "[")), row


def _command(*path):
    return dict(_commands())[path]


def _param(path, name):
    return next(param for param in _command(*path).params if param.name == name or name in getattr(param, "opts", ()))


def test_closed_sets_are_choices_from_the_library():
    from dp360 import weights
    from dp360.diffusion.models.bundle import KIND_COMPONENTS
    from dp360.diffusion.models.configs import FAMILIES
    from dp360.nerf.common import FIT_PRESETS
    from dp360.nerf.mesh import MESH_FORMATS
    from dp360.nerf.render import FORMATS

    expected = {
        (("render",), "--format"): set(FORMATS),
        (("reconstruct",), "--fit-preset"): set(FIT_PRESETS),
        (("reconstruct",), "--mesh-format"): set(MESH_FORMATS),
        (("export",), "--format"): set(MESH_FORMATS),
        (("weights", "verify"), "kind"): {*KIND_COMPONENTS, "panohead"},
        (("weights", "convert"), "kind"): {*KIND_COMPONENTS, "panohead"},
        (("weights", "verify"), "--family"): set(FAMILIES),
        (("weights", "convert"), "--family"): set(FAMILIES),
        (("weights", "download"), "what"): {*weights.OFFICIAL_FILES, *weights.EXTRA_FILES},
    }
    for (path, name), choices in expected.items():
        assert _choices(_param(path, name)) == choices, (path, name)
        code, text = _help(*path)
        assert code == 0 and all(choice in text for choice in choices), text


@pytest.mark.parametrize(
    ("args", "wrong"),
    [
        (("render", ".", "--out", "t.mp4", "--format", "avi"), "avi"),
        (("export", ".", "--format", "stl"), "stl"),
        (("reconstruct", "x.png", "--out", "o", "--fit-preset", "fast"), "fast"),
        (("reconstruct", "x.png", "--out", "o", "--mesh-format", "stl"), "stl"),
        (("weights", "download", "everything"), "everything"),
        (("weights", "convert", "front"), "front"),
        (("weights", "verify", "main", "--family", "sdxl"), "sdxl"),
    ],
)
def test_a_value_outside_a_closed_set_exits_2_naming_the_choices(args, wrong, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, list(args), env=WIDE)
    text = " ".join(result.stderr.split())
    assert result.exit_code == 2 and f"'{wrong}' is not one of" in text, text
    assert not (tmp_path / "o").exists()


def test_the_library_receives_plain_strings(monkeypatch, tmp_path):
    """Enum choices reach the library as their values, not as enum members."""
    from dp360.diffusion.models import bundle
    from dp360.errors import Dp360Error
    from dp360.nerf import render

    seen = {}

    def refuse(name):
        def record(*args, **kwargs):
            seen[name] = (args, kwargs)
            raise Dp360Error("stop here.")

        return record

    monkeypatch.setattr(render, "check_turntable_target", refuse("render"))
    result = CliRunner().invoke(app, ["render", str(tmp_path), "--out", str(tmp_path / "t"), "--format", "gif"])
    assert result.exit_code == 2 and type(seen["render"][0][1]) is str and seen["render"][0][1] == "gif"

    monkeypatch.setattr(bundle, "convert_to_bundle", refuse("convert"))
    checkpoint = tmp_path / "main.th"
    checkpoint.write_bytes(b"")
    args = ["weights", "convert", "main", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "b")]
    result = CliRunner().invoke(app, [*args, "--family", "tiny"])
    (_, _, kind), options = seen["convert"]
    assert result.exit_code == 2 and type(kind) is str and kind == "main"
    assert type(options["family"]) is str and options["family"] == "tiny"


# --------------------------------------------------------------------------------------------
# reconstruct is views and more
# --------------------------------------------------------------------------------------------


def test_reconstruct_takes_every_views_option_with_its_default():
    views, reconstruct = _options(_command("views")), _options(_command("reconstruct"))
    missing = sorted(set(views) - set(reconstruct))
    assert not missing, f"reconstruct lacks the views options {missing}"
    for name, param in views.items():
        other = reconstruct[name]
        if param is None:  # --help
            continue
        assert other.default == param.default, name
        assert getattr(other, "is_flag", False) == getattr(param, "is_flag", False), name
        assert _choices(other) == _choices(param), name


def test_batch_takes_every_reconstruct_option_with_its_default():
    reconstruct, batch = _options(_command("reconstruct")), _options(_command("batch"))
    per_portrait = {"--face-index"}  # which face of one photo: no meaning across many
    missing = sorted(set(reconstruct) - set(batch) - per_portrait)
    assert not missing, f"batch lacks the reconstruct options {missing}"
    for name, param in reconstruct.items():
        if param is None or name in per_portrait or name == "--device":  # batch: auto|cpu|cuda, one GPU per worker
            continue
        other = batch[name]
        assert other.default == param.default, name
        assert _choices(other) == _choices(param), name


# --------------------------------------------------------------------------------------------
# Help names only options the command has
# --------------------------------------------------------------------------------------------

OPTION = re.compile(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)")
SUGGESTION = re.compile(r"`(dp360 [^`]+)`")


def _strings(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, text) of every string literal in a syntax tree: implicitly concatenated literals as
    one, f-strings with their fields as `{...}`."""
    found: list[tuple[int, str]] = []

    def visit(node):
        if isinstance(node, ast.JoinedStr):
            fields = ("{" + ast.unparse(part.value) + "}" for part in node.values if not isinstance(part, ast.Constant))
            text = "".join(part.value if isinstance(part, ast.Constant) else next(fields) for part in node.values)
            found.append((node.lineno, text))
            return
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append((node.lineno, node.value))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _own_options_named(text: str) -> set[str]:
    """The --options a text names, except inside a suggested `dp360 ...` command (checked below)."""
    return set(OPTION.findall(SUGGESTION.sub("", text)))


@pytest.mark.parametrize("path", [path for path, _ in _commands()], ids=lambda path: " ".join(path) or "dp360")
def test_help_and_messages_name_only_options_the_command_has(path):
    command = dict(_commands())[path]
    texts = [command.help or ""] + [getattr(param, "help", None) or "" for param in command.params]
    if command.callback is not None:
        # the messages the command itself prints
        callback = inspect.unwrap(command.callback)
        texts += [text for _, text in _strings(ast.parse(textwrap.dedent(inspect.getsource(callback))))]
    named = set().union(*map(_own_options_named, texts))
    assert named <= set(_options(command)), f"{' '.join(path)} names {sorted(named - set(_options(command)))}"


# --------------------------------------------------------------------------------------------
# Suggested commands exist
# --------------------------------------------------------------------------------------------


def _is_placeholder(token: str) -> bool:
    """RUN_DIR, <kind>, {name}, [OPTIONS], ...: stands for a value, not a value."""
    bare = token.rstrip(".,;:")
    return (
        bare in ("", "...", "…")
        or bare[:1] in "<{["
        or "{" in bare
        or (any(c.isalpha() for c in bare) and bare.upper() == bare)
    )


def problems_of(suggestion: str) -> list[str]:
    """What is wrong with a suggested command line: an unknown command, option, positional value
    or choice. Placeholders stand for any value."""
    tokens = suggestion.split()
    assert tokens[0] == "dp360", suggestion
    command, path, rest = _root(), [], tokens[1:]
    while getattr(command, "commands", None) and rest and not rest[0].startswith("-"):
        if _is_placeholder(rest[0]):
            return []  # `dp360 COMMAND ...`: nothing more to check
        if rest[0] not in command.commands:
            return [f"`{' '.join(['dp360', *path])}` has no command '{rest[0]}'"]
        path.append(rest[0])
        command, rest = command.commands[rest[0]], rest[1:]
    code, text = _help(*path)
    problems = [] if code == 0 else [f"`dp360 {' '.join(path)} --help` exits {code}: {text}"]
    options, arguments = _options(command), _arguments(command)
    where = f"`{' '.join(['dp360', *path])}`"
    while rest:
        token, rest = rest[0], rest[1:]
        if token.startswith("-") and token not in ("-", "--"):
            name, _, value = token.partition("=")
            if name not in options:
                problems.append(f"{where} has no option {name}")
                continue
            param = options[name]
            if param is None or getattr(param, "is_flag", False):
                continue
            if not value and rest:
                value, rest = rest[0], rest[1:]
            choices = _choices(param)
            if value and choices is not None and not _is_placeholder(value) and value not in choices:
                problems.append(f"{where} {name} takes one of {sorted(choices)}, not '{value}'")
            continue
        if _is_placeholder(token):
            if arguments and arguments[0].nargs == 1:
                arguments = arguments[1:]
            continue
        if not arguments:
            problems.append(f"{where} takes no argument '{token}'")
            continue
        argument = arguments[0]
        if argument.nargs == 1:
            arguments = arguments[1:]
        choices = _choices(argument)
        if choices is not None and token not in choices:
            problems.append(f"{where} {argument.name.upper()} is one of {sorted(choices)}, not '{token}'")
    return problems


def _source_files() -> list[Path]:
    return sorted(path for folder in ("dp360", "cli") for path in (REPO / folder).rglob("*.py"))


def suggested_commands() -> list[tuple[str, str]]:
    """(file:line, command) for every `dp360 ...` in the source's strings and comments; a `&&`
    chain gives one command per part."""
    found = []
    for path in _source_files():
        source = path.read_text()
        where = str(path.relative_to(REPO))
        texts = _strings(ast.parse(source))
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                texts.append((token.start[0], token.string))
        found += [(f"{where}:{line}", command) for line, text in texts for command in commands_in(text)]
    return sorted(set(found))


def commands_in(text: str) -> list[str]:
    """The `dp360 ...` commands a text suggests in backticks (a `&&` chain gives one per part), or
    the text itself when it is one command line (built, then shown by its caller)."""
    spans = [match.group(1) for match in SUGGESTION.finditer(text)]
    if not spans and text.startswith("dp360 ") and "\n" not in text:
        spans = [text]
    return [part.strip() for span in spans for part in span.split("&&") if part.strip().startswith("dp360 ")]


def test_the_checker_catches_what_does_not_exist():
    assert commands_in("run `dp360 weights download main && dp360 weights convert main` first") == [
        "dp360 weights download main",
        "dp360 weights convert main",
    ]
    assert commands_in("dp360 weights download {name}") == ["dp360 weights download {name}"]
    assert problems_of("dp360 weights download main") == []
    assert problems_of("dp360 weights download {name}") == []
    assert problems_of("dp360 reconstruct IMAGE --out OUT --fit-preset test --mesh-format ply --force") == []
    assert problems_of("dp360 render RUN_DIR --out turntable.gif") == []
    assert problems_of("dp360 weights <kind>") == []
    assert problems_of("dp360 weights fetch main")  # no such command
    assert problems_of("dp360 reshape photo.png")  # no such command
    assert problems_of("dp360 reconstruct photo.png --no-such-option")  # no such option
    assert problems_of("dp360 render RUN_DIR --json")  # an option of another command
    assert problems_of("dp360 weights download everything")  # not among the choices
    assert problems_of("dp360 weights convert main back")  # one argument only
    assert problems_of("dp360 export RUN_DIR --format stl")  # an option value not among the choices
    assert problems_of("dp360 doctor now")  # no arguments


def test_suggested_commands_exist():
    suggestions = suggested_commands()
    assert len(suggestions) > 10  # the scan finds them (f-strings, implicit concatenation, comments)
    broken = {
        f"{where}: `{command}`: {'; '.join(problems)}"
        for where, command in suggestions
        if (problems := problems_of(command))
    }
    assert not broken, "\n".join(sorted(broken))


# --------------------------------------------------------------------------------------------
# Model loading says nothing
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoints(tiny_weights):
    """The folder of the tiny official-layout checkpoints (main.th, back.th) and their fp32 bundles."""
    return tiny_weights(8).checkpoints["main"].parent


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(f"{record.name}: {record.getMessage()}")


@pytest.fixture
def library_warnings():
    """What diffusers and transformers log at WARNING or above, and Python warnings, meanwhile."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    records = _Records()
    loggers = [diffusers_logging.get_logger("diffusers"), transformers_logging.get_logger("transformers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
        logger.addHandler(records)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield records.messages
    records.messages += [f"{item.category.__name__}: {item.message}" for item in caught]
    for logger, level in zip(loggers, levels):
        logger.removeHandler(records)
        logger.setLevel(level)


def test_conversion_writes_each_dtype_without_a_float32_warning(tiny_checkpoints, tmp_path, library_warnings):
    """The components are built in the bundle's dtype (diffusers warns at every `.to(dtype)`), and
    the half-precision bundle holds exactly the full-precision one rounded."""
    import torch
    from safetensors.torch import load_file

    from dp360.diffusion.models.bundle import KIND_COMPONENTS, WEIGHT_FILES, convert_to_bundle

    full = convert_to_bundle(tiny_checkpoints / "main.th", tmp_path / "fp32", "main", family="tiny")
    half = convert_to_bundle(
        tiny_checkpoints / "main.th", tmp_path / "fp16", "main", family="tiny", dtype=torch.float16
    )
    assert not [message for message in library_warnings if "float32" in message or "fp32" in message], library_warnings
    for name in KIND_COMPONENTS["main"]:
        file_name = WEIGHT_FILES.get(name, "diffusion_pytorch_model.safetensors")
        wide, narrow = load_file(full / name / file_name), load_file(half / name / file_name)
        assert wide.keys() == narrow.keys()
        for key, tensor in wide.items():
            expected = tensor.to(torch.float16) if tensor.is_floating_point() else tensor
            assert narrow[key].dtype == expected.dtype and torch.equal(narrow[key], expected), (name, key)


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32"])
def test_loading_a_bundle_warns_nothing_and_gives_the_requested_dtype(tiny_checkpoints, dtype_name, library_warnings):
    import torch

    from dp360.diffusion.models.bundle import load_bundle

    dtype = getattr(torch, dtype_name)
    for kind in ("main", "back"):
        pipeline = load_bundle(tiny_checkpoints / f"{kind}-bundle", device="cpu", dtype=dtype)
        modules = {name: module for name, module in pipeline.components.items() if isinstance(module, torch.nn.Module)}
        assert len(modules) >= 5
        for name, module in modules.items():
            floats = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
            assert floats and {t.dtype for t in floats} == {dtype}, name
    assert library_warnings == []
