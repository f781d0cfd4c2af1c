"""What a new user meets first: the README's CPU snippets run as written, the error for
transposed weights names the transposition, and ``moe-kernels check --help`` explains its
options. (Inline activations in replace_moe_layers: tests/test_replace_layers.py.)"""

import os
import re
import subprocess
import sys

import pytest
import torch

from moe_kernels import expert_params
from moe_kernels.cli import build_parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_blocks(marker: str) -> list[str]:
    with open(os.path.join(REPO, "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    return [b for b in blocks if marker in b]


def test_readme_functional_snippet_runs_with_its_shapes():
    (block,) = readme_blocks("T, H, I, E = ")
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["out"].shape == scope["x2d"].shape == (scope["T"], scope["H"])
    assert torch.isfinite(scope["out"]).all()


def test_readme_tiny_hf_snippet_runs_on_cpu(capsys):
    pytest.importorskip("transformers")
    (block,) = readme_blocks("Qwen3MoeConfig(")
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["model"].config._experts_implementation == "moe_kernels"
    assert "tensor(" in capsys.readouterr().out  # the generated ids were printed


@pytest.mark.parametrize("w13_shape,w2_shape,transposed,match", [
    ((4, 16, 24), (4, 16, 12), False, r"w13: got shape \(4, 16, 24\), which looks transposed"),  # w13 [E, H, 2I]
    ((4, 24, 16), (4, 12, 16), False, r"w2: got shape \(4, 12, 16\), which looks transposed"),   # w2 [E, I, H]
    ((4, 24, 16), (4, 16, 12), True, r"the HF 5 layout .* pass transposed=False"),              # flag wrong
])
def test_transposed_weights_are_named(w13_shape, w2_shape, transposed, match):
    # Before: "w2: expected shape [4, 24, I] to match w13 (E=4, H=24)": the wrong tensor and a wrong H.
    with pytest.raises(ValueError, match=match):
        expert_params(torch.randn(w13_shape), torch.randn(w2_shape), transposed=transposed)


def test_mismatch_that_is_not_a_transposition_keeps_the_generic_message():
    with pytest.raises(ValueError, match=r"w2: expected shape \[4, 16, I\] to match w13"):
        expert_params(torch.randn(4, 24, 16), torch.randn(4, 17, 12))


def test_check_help_describes_every_option():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["check"]
    options = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in options} == {"device", "dtype", "tokens", "hidden", "intermediate", "experts"}
    for a in options:
        assert a.help, f"--{a.dest} has no description"
    text = subprocess.run([sys.executable, "-m", "moe_kernels", "check", "--help"], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO)).stdout
    assert "hidden size H" in text and "(default: 72)" in text
