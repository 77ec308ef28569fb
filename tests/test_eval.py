"""lm-eval integration on local task files: documented commands, result JSON, comparison table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import hf_helpers as H
import pytest
import torch

from olmoe_spattn.evaluation.report import compare_markdown, load_run, scores_from_lm_eval
from olmoe_spattn.evaluation.suite import PAPER_PASSES, expand_tasks
from olmoe_spattn.hf.convert import convert_to_hf

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "eval" / "tasks"
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Converted tiny dense and band models with a local tokenizer."""
    root = tmp_path_factory.mktemp("eval_models")
    tok = H.build_tokenizer(root / "tok")
    out = {}
    for pattern in ("dense", "spattention"):
        config = H.model_config(pattern)
        model = H.build_olmo_model(config)
        ckpt = H.save_unsharded(model, config, root / f"olmo_{pattern}", tok)
        out[pattern] = convert_to_hf(ckpt, root / f"hf_{pattern}")
    return out


@pytest.fixture(scope="module")
def our_runs(models, tmp_path_factory) -> dict[str, Path]:
    """``olmoe-spattn eval`` on the offline group for both models: run JSON per pattern."""
    from olmoe_spattn.cli import main

    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for pattern, path in models.items():
        out = root / f"{pattern}.json"
        rc = main(["eval", str(path), "--tasks", "spattn_offline", "--limit", "4", "--device", "cpu",
                   "--batch-size", "2", "--include-path", str(TASKS), "--out", str(out), "--name", pattern])  # fmt: skip
        assert rc == 0
        runs[pattern] = out
    return runs


def _results_file(out_dir: Path) -> dict:
    files = sorted(out_dir.rglob("results*.json"))
    assert files, f"lm_eval wrote no results under {out_dir}"
    return json.loads(files[-1].read_text())


def test_paper_groups_are_defined():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS))
    groups = set(manager.all_groups)
    assert {"paper", "paper_mmlu", "spattn_offline"} <= groups
    assert {"spattn_tiny_mc", "spattn_tiny_cloze"} <= set(manager.all_tasks)
    import yaml

    paper = yaml.safe_load((TASKS / "paper" / "paper.yaml").read_text())
    assert paper["task"] == ["winogrande", "copa", "hellaswag", "mmlu_stem", "mmlu_social_sciences", "mmlu_humanities"]
    mmlu = yaml.safe_load((TASKS / "paper" / "paper_mmlu.yaml").read_text())
    assert mmlu["task"] == ["mmlu_stem", "mmlu_social_sciences", "mmlu_humanities"]
    for name in paper["task"]:  # every member is a task or group lm-eval knows
        assert name in manager.all_tasks or name in groups, name


def test_plain_lm_eval_command_runs_band_model(models, our_runs, tmp_path):
    """The README's plain lm_eval line, on the offline group: same scores as our command."""
    cmd = [
        "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={models['spattention']},trust_remote_code=True",
        "--include_path", str(TASKS), "--tasks", "spattn_offline",
        "--limit", "4", "--device", "cpu", "--batch_size", "2",
        "--output_path", str(tmp_path / "out"), "--log_samples",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**OFFLINE_ENV, "HF_MODULES_CACHE": str(tmp_path / "mods")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _results_file(tmp_path / "out")
    scores = scores_from_lm_eval(results)
    assert 0.0 <= scores["spattn_tiny_mc"]["acc"] <= 1.0
    assert "spattn_tiny_cloze" in scores and "spattn_offline" in scores
    ours = load_run(our_runs["spattention"])["scores"]
    for task in ("spattn_tiny_mc", "spattn_tiny_cloze", "spattn_offline"):
        assert ours[task] == pytest.approx(scores[task]), task
    _check_loglikelihoods_are_band_not_dense(models["spattention"], tmp_path / "out")


def _continuation_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log P(continuation | context) from an OLMo-core model, tokenized the way lm-eval's HF model
    does it (trailing context spaces move to the continuation; context and whole encoded alone)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(context + continuation, add_special_tokens=False)["input_ids"][len(ctx) :]
    ids = torch.tensor([ctx + cont])  # [1, T]
    logprobs = H.olmo_logits(model, ids[:, :-1]).log_softmax(-1)[0]  # [T - 1, V]
    return sum(logprobs[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))


def _check_loglikelihoods_are_band_not_dense(hf_dir: Path, out_dir: Path) -> None:
    """Every loglikelihood lm_eval logged equals the OLMo-core band model's own (the checkpoint the
    HF directory was converted from), and not the same weights' with dense attention: scores alone
    could not tell the two apart."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    band = H.build_olmo_model(H.model_config("spattention"))
    dense = H.build_olmo_model(H.model_config("dense"))
    dense.load_state_dict(band.state_dict())
    files = sorted(out_dir.rglob("samples_*.jsonl"))
    assert len(files) == 2, files  # spattn_tiny_mc, spattn_tiny_cloze
    n = differs = 0
    for file in files:
        for line in file.read_text().splitlines():
            sample = json.loads(line)
            for args, resp in zip(sample["arguments"].values(), sample["resps"]):
                context, continuation = args["arg_0"], args["arg_1"]
                logged = float(resp[0][0])
                want = _continuation_loglikelihood(band, tok, context, continuation)
                assert logged == pytest.approx(want, rel=1e-4, abs=1e-4), (context, continuation)
                differs += abs(logged - _continuation_loglikelihood(dense, tok, context, continuation)) > 1e-2
                n += 1
    assert n >= 20 and differs >= n // 2, (n, differs)


def test_python_m_evaluation_uses_registered_model(models, tmp_path):
    cmd = [
        sys.executable, "-m", "olmoe_spattn.evaluation", "--model", "olmoe-spattn",
        "--model_args", f"pretrained={models['spattention']}",
        "--include_path", str(TASKS), "--tasks", "spattn_tiny_mc",
        "--limit", "4", "--device", "cpu", "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=OFFLINE_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "spattn_tiny_mc" in scores_from_lm_eval(_results_file(tmp_path / "out"))


def test_eval_command_and_compare(our_runs, tmp_path, capsys):
    from olmoe_spattn.cli import main

    runs = []
    for pattern, out in our_runs.items():
        run = load_run(out)
        assert run["attention_pattern"] == pattern
        assert set(run["scores"]) >= {"spattn_tiny_mc", "spattn_tiny_cloze", "spattn_offline"}
        runs.append(out)
    capsys.readouterr()
    md = tmp_path / "table.md"
    assert main(["eval", "--compare", *map(str, runs), "--markdown", str(md)]) == 0
    table = md.read_text()
    assert table == capsys.readouterr().out
    lines = table.strip().splitlines()
    assert lines[0].startswith("| Method |") and "Average" in lines[0]
    assert lines[2].startswith("| dense |") and lines[3].startswith("| spattention |")
    dense_mc = load_run(runs[0])["scores"]["spattn_tiny_mc"]["acc"]
    assert f"{dense_mc:.4f}" in lines[2]


def test_paper_suite_runs_two_passes_and_tags_five_shot(models, tmp_path, monkeypatch):
    """`--tasks paper`: zero-shot group then MMLU five-shot, merged into one run (lm-eval stubbed:
    the real paper tasks download their datasets)."""
    import lm_eval

    from olmoe_spattn.cli import main

    calls = []

    def fake_simple_evaluate(**kwargs):
        calls.append(kwargs)
        shots = kwargs["num_fewshot"]
        names = ["winogrande", "copa", "hellaswag", "mmlu_stem", "mmlu_social_sciences", "mmlu_humanities"]
        if kwargs["tasks"] == ["paper_mmlu"]:
            names = names[3:]
        results = {n: {"alias": n, "acc,none": 0.25 + 0.01 * i + 0.1 * (shots == 5)} for i, n in enumerate(names)}
        results[kwargs["tasks"][0]] = {"acc,none": 0.5}
        return {"results": results, "groups": {kwargs["tasks"][0]: {"acc,none": 0.5}}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_simple_evaluate)
    out = tmp_path / "paper.json"
    assert main(["eval", str(models["spattention"]), "--tasks", "paper", "--device", "cpu",
                 "--include-path", str(TASKS), "--out", str(out)]) == 0  # fmt: skip
    assert [(c["tasks"], c["num_fewshot"]) for c in calls] == [(["paper"], 0), (["paper_mmlu"], 5)]
    assert all(c["model"] == "olmoe-spattn" for c in calls)
    scores = load_run(out)["scores"]
    assert "paper" not in scores and "paper_mmlu@5shot" not in scores
    assert scores["mmlu_stem"]["acc"] == pytest.approx(0.28)
    assert scores["mmlu_stem@5shot"]["acc"] == pytest.approx(0.35)
    header = compare_markdown([load_run(out)]).splitlines()[0]
    assert header == ("| Method | Winogrande | COPA | HellaSwag | STEM | SocSci | Humanities | STEM (5-shot) "
                      "| SocSci (5-shot) | Humanities (5-shot) | Average |")


def test_expand_tasks():
    assert expand_tasks("paper", None) == list(PAPER_PASSES)
    passes = expand_tasks("paper,arc_easy", None)
    assert passes[-1].tasks == ("arc_easy",) and passes[-1].num_fewshot is None
    assert expand_tasks("arc_easy,piqa", 3)[0].suffix == "@3shot"
    with pytest.raises(ValueError, match="num-fewshot"):
        expand_tasks("paper", 5)
    with pytest.raises(ValueError, match="empty"):
        expand_tasks(" , ", None)


def test_compare_markdown_paper_order_bold_and_average():
    a = {"name": "dense", "scores": {"copa": {"acc": 0.6}, "winogrande": {"acc": 0.5},
                                     "mmlu_stem@5shot": {"acc": 0.3}, "hellaswag": {"acc": 0.1, "acc_norm": 0.4}}}
    b = {"name": "band", "scores": {"copa": {"acc": 0.7}, "winogrande": {"acc": 0.4},
                                    "mmlu_stem@5shot": {"acc": 0.3}, "hellaswag": {"acc_norm": 0.5}}}
    lines = compare_markdown([a, b]).strip().splitlines()
    assert lines[0] == "| Method | Winogrande | COPA | HellaSwag | STEM (5-shot) | Average |"
    assert lines[2] == "| dense | **0.5000** | 0.6000 | 0.4000 | **0.3000** | 0.4500 |"
    assert lines[3] == "| band | 0.4000 | **0.7000** | **0.5000** | **0.3000** | **0.4750** |"


def test_load_run_rejects_other_json(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"results": {}}))
    with pytest.raises(ValueError, match="scores"):
        load_run(bad)


def test_dynamic_partition_model_evaluates_one_sequence_at_a_time(tmp_path, capsys):
    from olmoe_spattn.cli import main

    config = H.model_config("spattention", "dynamic")
    model = H.build_olmo_model(config)
    tok = H.build_tokenizer(tmp_path / "tok")
    hf_dir = convert_to_hf(H.save_unsharded(model, config, tmp_path / "olmo", tok), tmp_path / "hf")
    out = tmp_path / "dyn.json"
    assert main(["eval", str(hf_dir), "--tasks", "spattn_tiny_mc", "--limit", "3", "--batch-size", "4",
                 "--device", "cpu", "--include-path", str(TASKS), "--out", str(out)]) == 0  # fmt: skip
    assert "--batch-size 4 -> 1" in capsys.readouterr().out
    assert load_run(out)["partition_len"] == "dynamic"
