"""``olmoe-spattn bench backward``: the backward schedules side by side (here on the CPU, through the
Triton interpreter; the CuTe schedule reports why it cannot run)."""

from __future__ import annotations

import json

import pytest

from olmoe_spattn.cli import main


def test_times_every_schedule_and_says_why_one_cannot_run(tmp_path, capsys):
    out_json, out_md = tmp_path / "backward.json", tmp_path / "backward.md"
    status = main(["bench", "backward", "--shapes", "1,2,40,16", "--patterns", "spattention",
                   "--schedules", "two_pass,one_pass,cute", "--rounds", "1", "--iters", "1", "--dtype", "fp16",
                   "--json", str(out_json), "--out", str(out_md)])
    assert status == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["shape"] == [1, 2, 40, 16] and rows[0]["pattern"] == "spattention"
    two, one, cute = (rows[0]["schedules"][name] for name in ("two_pass", "one_pass", "cute"))
    assert two["status"] == "ok" and two["ms"] > 0 and two["max_diff"] == 0
    assert one["status"] == "ok" and one["ms"] > 0 and 0 <= one["max_diff"] < 5e-3  # fp16 gradients, fp32 adds
    assert cute["status"] == "not taken: needs a CUDA GPU"
    table = out_md.read_text()
    assert "| 1,2,40,16 | spattention |" in table and "not taken: needs a CUDA GPU" in table
    assert "| two_pass | one_pass | cute |" in capsys.readouterr().out


def test_unknown_schedule_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "backward", "--schedules", "two_pass,three_pass"])
    assert "unknown schedule ['three_pass']; allowed: cute, two_pass, one_pass" in capsys.readouterr().err


def test_packed_documents(tmp_path):
    out_json = tmp_path / "backward.json"
    status = main(["bench", "backward", "--shapes", "2,2,100,16", "--patterns", "sliding_window", "--docs", "3",
                   "--schedules", "two_pass,one_pass", "--rounds", "1", "--iters", "1", "--dtype", "fp16",
                   "--json", str(out_json)])
    assert status == 0
    data = json.loads(out_json.read_text())
    assert data["docs"] == 3 and data["rows"][0]["docs"] == 3
    one = data["rows"][0]["schedules"]["one_pass"]
    assert one["status"] == "ok" and 0 <= one["max_diff"] < 5e-3


@pytest.mark.parametrize(("t", "n"), [(100, 3), (65536, 8), (5, 5), (7, 1)])
def test_document_lengths(t, n):
    from olmoe_spattn.bench.backward import document_lengths

    lengths = document_lengths(t, n)
    assert len(lengths) == n and sum(lengths) == t and min(lengths) >= 1
    assert lengths == sorted(lengths)  # uneven: short to long


def test_more_documents_than_tokens_is_refused():
    from olmoe_spattn.bench.backward import document_lengths

    with pytest.raises(ValueError, match="--docs 9: each row of 8 tokens holds 1 to 8 documents"):
        document_lengths(8, 9)
