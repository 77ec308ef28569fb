"""`olmoe-spattn show-pattern`: picture and text summary."""

from __future__ import annotations

import subprocess
import sys

import pytest

from olmoe_spattn.cli import main


def test_writes_png_and_prints_summary(tmp_path, capsys):
    out = tmp_path / "p.png"
    assert main(["show-pattern", "--pattern", "spattention", "--heads", "8", "--seq-len", "64", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "union of heads covers 2080/2080 = 100.0%" in text
    assert text.count("\n") >= 10  # header + 8 heads + totals


def test_exclusive_bands_summary_counts_one_over_h_of_the_work(capsys):
    assert main(["show-pattern", "--pattern", "exclusive_bands", "--heads", "4", "--seq-len", "32"]) == 0
    text = capsys.readouterr().out
    assert "= 25.0% of dense causal work" in text
    assert "covers 528/528" in text
    assert "[24,32)" in text


def test_bad_values_give_clear_errors(capsys):
    assert main(["show-pattern", "--heads", "8", "--partition-len", "4"]) == 2
    assert "partition_len=4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["show-pattern", "--pattern", "nonsense"])
    for argv in (["show-pattern"], ["toggle", "x.yaml", "--attention", "dense"], ["convert", "from-hf", "a", "b"]):
        with pytest.raises(SystemExit):
            main([*argv, "--partition-len", "4k"])
        assert "--partition-len: must be an integer or 'dynamic', got '4k'" in capsys.readouterr().err


def test_console_script_help():
    res = subprocess.run([sys.executable, "-m", "olmoe_spattn.cli", "show-pattern", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--partition-len" in res.stdout
