"""Careless and hostile input to the command line: one line on stderr, exit 2, bounded cost.

Each case was reproduced on an earlier main (issue 16): a 352-byte alias bomb took 11 GB and
printed a 2 GB line, a binary recipe exited 1 with "internal error: UnicodeDecodeError", an
empty recipe ran the defaults and --debug turned exit 2 into exit 1.
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

from compressor.errors import UserError
from compressor.recipe import MAX_RECIPE_VALUES, load_recipe

# Nine anchors, each a list of nine references to the previous one: 9^9 (387M) leaves.
ALIAS_BOMB = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]" for p, c in zip("abcdefgh", "bcdefghi")]
) + "\n"


def compress(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`compress ARGS` in a child whose address space is capped at 4 GB (a bomb would die, not swap)."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    code = "import sys; from compressor.cli import main; sys.argv[0] = 'compress'; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, preexec_fn=cap)


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and len(lines[0]) < 1000, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_a_yaml_alias_bomb_is_a_one_line_error_in_bounded_memory(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)
    assert len(ALIAS_BOMB) < 400
    one_line_error(compress("validate", str(bomb)), str(bomb), f"more than {MAX_RECIPE_VALUES} values")


def test_a_big_bad_value_is_shown_shortened(tmp_path):
    recipe = tmp_path / "long.yaml"
    recipe.write_text(f"output: {['x' * 50] * 1000}\n")  # a list where a string belongs: 50 kB of value
    line = one_line_error(compress("validate", str(recipe)), "output: ", "is not allowed", "characters)")
    assert len(line) < 600


def test_a_binary_recipe_is_a_user_error(tmp_path):
    binary = tmp_path / "model.safetensors.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    one_line_error(compress("validate", str(binary)), "not UTF-8 text")
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"model: smollm2-135m\n\x00\x00\x00")
    one_line_error(compress("validate", str(nul)), "NUL bytes")


def test_an_oversized_recipe_is_refused_before_reading_it(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2 << 20) + "\n")
    one_line_error(compress("validate", str(big)), "too big for a recipe")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"], ids=["empty", "blank", "comment"])
def test_an_empty_recipe_is_an_error_not_the_defaults(tmp_path, text):
    empty = tmp_path / "empty.yaml"
    empty.write_text(text)
    with pytest.raises(UserError, match="the recipe is empty"):
        load_recipe(empty)


def test_debug_keeps_the_exit_code_and_shows_the_traceback(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    plain = compress("validate", str(empty))
    debug = compress("--debug", "validate", str(empty))
    assert plain.returncode == debug.returncode == 2
    assert "Traceback" in debug.stderr and "Traceback" not in plain.stderr
    assert "error: " in debug.stderr and "the recipe is empty" in debug.stderr


def test_a_bad_set_value_is_a_user_error(tmp_path):
    one_line_error(compress("validate", "--set", "stages=[{quantize: {bits: 4}", str(Path(__file__).parent.parent / "recipes" / "smollm2-w4g64.yaml")),
                   "--set stages", "not a valid YAML value")  # fmt: skip


def test_info_on_an_invalid_config_json_is_a_user_error(tmp_path):
    bad = tmp_path / "artifact"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    one_line_error(compress("info", str(bad)), "config.json: unreadable JSON")
