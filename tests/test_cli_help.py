"""The command line starts without torch: ``--help`` of every subcommand (and every benchmark
kind) imports no torch, OLMo-core, transformers or lm-eval, and ``import olmoe_spattn`` neither.
Checked through ``sys.modules`` in a fresh interpreter, not by timing."""

from __future__ import annotations

import subprocess
import sys

from olmoe_spattn.cli import SUBCOMMANDS
from olmoe_spattn.commands.bench import KINDS

HEAVY = ("torch", "olmo_core", "transformers", "lm_eval", "triton", "matplotlib", "numpy")

PROBE = """
import contextlib, io, sys
from olmoe_spattn.cli import main
for argv in {argvs!r}:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(argv + ["--help"])
        except SystemExit as exit:
            assert exit.code == 0, (argv, exit.code)
    assert "usage: olmoe-spattn" in out.getvalue(), argv
    loaded = [m for m in {heavy!r} if m in sys.modules]
    assert not loaded, f"olmoe-spattn {{' '.join(argv)}} --help imported {{loaded}}"
print("ok")
"""


def _probe(argvs: list[list[str]]) -> subprocess.CompletedProcess:
    code = PROBE.format(argvs=argvs, heavy=HEAVY)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_every_help_imports_nothing_heavy():
    argvs = [[]] + [[name] for name in SUBCOMMANDS] + [["bench", kind] for kind in KINDS]
    proc = _probe(argvs)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def test_probe_catches_a_heavy_import(tmp_path):
    """The probe above can fail: a subcommand whose module imports torch is reported."""
    pkg = tmp_path / "heavy_cmd"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "cmd.py").write_text("import torch\n\ndef add_arguments(p):\n    pass\n\ndef run(a):\n    return 0\n")
    code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
            "import olmoe_spattn.cli as cli\n"
            "cli.SUBCOMMANDS['heavy'] = ('x', 'imports torch')\n"
            "import importlib; real = importlib.import_module\n"
            "cli.importlib.import_module = lambda n: real('heavy_cmd.cmd' if n.endswith('.x') else n)\n")
    proc = subprocess.run([sys.executable, "-c", code + PROBE.format(argvs=[["heavy"]], heavy=HEAVY)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "heavy --help imported ['torch'" in proc.stderr


def test_python_dash_m_and_bare_import():
    proc = subprocess.run([sys.executable, "-m", "olmoe_spattn", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("olmoe-spattn "), proc.stderr
    code = f"import sys, olmoe_spattn; print([m for m in {HEAVY!r} if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr
