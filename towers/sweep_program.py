"""What the sweep's program makes of each run's command, asked before the first run is launched.

For ``train.py`` the command each run would get is parsed by train.py's own CLI (LightningCLI with
jsonargparse; nothing is built, no data read), so a parameter it does not know, or a value of the
wrong type, stops the agent with one line before any run is launched, instead of every run failing
with its usage. Another program is only checked to exist.
"""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from towers.sweep_state import SweepFileError, _one_line, next_params, render_command

_parsers = {}  # program path -> its CLI, built once: building the parser costs far more than a parse


def parse_train_config(program: Path, args: list):
    """train.py's module and resolved config for these arguments, parsed by its own CLI without
    building anything. A command line it refuses raises ``argparse.ArgumentError`` (or SystemExit)."""
    key = Path(program).resolve()
    argv, sys.argv = sys.argv, [str(program)]  # LightningCLI warns when args and sys.argv both have some
    try:
        if key in _parsers:
            module, cli = _parsers[key]
            try:
                cli.parse_arguments(cli.parser, args)
            except _Parsed:
                pass
        else:
            module, cli = _parse_only_cli(program, args)
            _parsers[key] = module, cli
    finally:
        sys.argv = argv
    return module, cli.config[cli.config["subcommand"]]


class _Parsed(Exception):
    """Raised by the parse-only CLI once train.py's parser has parsed: it carries the CLI and its config."""

    def __init__(self, cli):
        super().__init__("parsed")
        self.cli = cli


def _parse_only_cli(program: Path, args: list):
    module = sys.modules.get("train")
    if module is None or Path(getattr(module, "__file__", "")).resolve() != program.resolve():
        spec = importlib.util.spec_from_file_location("_towers_sweep_program", program)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)

    class ParseOnly(module.TowersCLI):
        def parse_arguments(self, parser, args):  # LightningCLI's public hook: parse, then stop before the
            super().parse_arguments(parser, args)  # seed is set or any class is built (no W&B, no run name)
            raise _Parsed(self)

    try:
        ParseOnly(
            module.TowerClassifier,
            module.ImageDataModule,
            args=args,
            save_config_callback=module.SaveRunConfig,
            parser_kwargs={"exit_on_error": False},  # an error is raised to us, not printed with the usage
        )
    except _Parsed as parsed:
        cli = parsed.cli
    return module, cli


def is_train_py(config: dict) -> bool:
    return Path(config["program"]).name == "train.py"


def checked_params(config: dict) -> list[dict]:
    """The parameter sets to parse: the engine's first run, then that run with each value of every
    parameter that lists ``values`` in its place, so every listed value is parsed once."""
    first = next_params(config, [])
    if first is None:
        return []
    sets = {json.dumps(first, sort_keys=True): first}
    for key, spec in config["parameters"].items():
        for value in spec.get("values", []):
            params = dict(first, **{key: value})
            sets.setdefault(json.dumps(params, sort_keys=True), params)
    return list(sets.values())


def check_program(config: dict, sweep_file) -> None:
    """Stop (:class:`SweepFileError`, one line) if a run's command would not parse for its program."""
    program = Path(config["program"])
    if not program.is_file():
        raise SweepFileError(
            f"{sweep_file}: its program {program} is not a file under {Path.cwd()}; start the agent in "
            f"the folder the sweep file's paths are relative to (for sweeps/*.yaml, the repository root)"
        )
    if not is_train_py(config):
        return
    for params in checked_params(config):
        command = render_command(config, params)
        if config["program"] not in command:  # a command that runs train.py some other way: not ours to parse
            return
        try:
            parse_train_config(program, command[command.index(config["program"]) + 1 :])
        except (argparse.ArgumentError, SystemExit, ValueError) as err:
            shown = " ".join(f"{k}={json.dumps(v)}" for k, v in params.items())
            reason = _one_line(err) if not isinstance(err, SystemExit) else f"exit status {err.code}"
            raise SweepFileError(
                f"{sweep_file}: the run with {shown} does not parse as {program}'s command line ({reason}); "
                f"nothing was launched"
            ) from None
