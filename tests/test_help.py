"""--help is the manual at hand: options grouped by what they are for, each with its range
and default, the exit codes, and examples that are real command lines."""
from __future__ import annotations

import re
import shlex

import rvc_modulator as rvc

GROUPS = ["conversion", "pitch", "retrieval", "output", "files and device", "modes", "training tools", "service"]


def help_text() -> str:
    return rvc.build_parser().format_help()


def test_options_are_grouped_in_order():
    text = help_text()
    positions = [text.index(f"\n{title}:\n") for title in GROUPS]
    assert positions == sorted(positions)
    parser = rvc.build_parser()
    grouped = {a.dest for g in parser._action_groups if g.title in GROUPS for a in g._group_actions}
    ungrouped = {a.dest for a in parser._actions if a.option_strings} - grouped
    assert ungrouped == {"help", "version"}


def test_every_ranged_option_shows_its_range_and_default():
    parser = rvc.build_parser()
    for action in parser._actions:
        if action.dest in rvc.RANGES:
            kind, low, high = rvc.RANGES[action.dest]
            shown = f"{low:g}..{high:g}" if kind is float else f"{low}..{high}"
            if action.dest not in ("start", "duration", "seed", "speaker_id"):  # open-ended: no range worth saying
                assert shown in action.help, (action.dest, action.help)
        if action.option_strings and action.default not in (None, False, "==SUPPRESS==") and action.dest != "help":
            assert "default" in action.help, (action.dest, action.help)


def test_the_exit_codes_are_all_listed():
    epilog = rvc.build_parser().epilog
    listed = {int(code) for code in re.findall(r"(\d+) [a-z]", epilog.split("examples:")[0])}
    assert listed == {getattr(rvc, name) for name in dir(rvc) if name.startswith("EXIT_")}


def test_the_examples_are_command_lines_the_parser_takes():
    examples = [line.split("  ", 2)[1] for line in rvc.HELP_EXAMPLES.splitlines()[1:]]
    assert len(examples) >= 3
    for example in examples:
        argv = shlex.split(example)
        assert argv[:2] == ["python", "rvc_modulator.py"]
        rvc.build_parser().parse_args(argv[2:])  # raises UsageError if not
