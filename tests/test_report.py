"""The results report: verdict rules, mean ± std over repeats, aligned loss curves, robustness to
damaged run files, and a study that lives in configs/ rather than in aedist/."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from aedist.errors import UserError
from aedist.report import read_curves, write_report
from aedist.runs import epoch_series, group_runs, load_run
from aedist.study import FAILS, HOLDS, SHOWN, UNTESTED, Rule, Stat, check_claim, decide, load_study

ROOT = Path(__file__).resolve().parents[1]
MakeRun = Callable[..., Path]


@pytest.fixture
def make_run(tmp_path: Path) -> MakeRun:
    """Write a finished run folder as the engine and evaluate.py leave it: ``make_run(name, epochs=3,
    metrics={...}, best={...})``; metrics.jsonl has step rows (0-based epoch in progress) and epoch rows
    (1-based) like the engine's."""

    def make(name: str, epochs: int = 3, metrics: dict[str, float] | None = None, best: dict[str, float] | None = None,
             shards: str = "shards/tiny", group: str = "g1", epoch_loss: bool = True) -> Path:
        run = tmp_path / "runs" / name
        (run / "figures").mkdir(parents=True)
        cfg = {"run": {"name": name}, "data": {"shards": shards}, "train": {"epochs": epochs, "mixed_precision": "auto"},
               "log": {"group": group}}
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        values = {"test/mse": 0.02, "test/psnr_db": 17.0, "test/snr_db": 8.0, **(metrics or {})}
        (run / "summary.json").write_text(json.dumps({"completed": True, "epoch": epochs, "train_seconds": 120.0,
                                                      "img_per_s": 1000.0, "mixed_precision": "bf16", **values}))
        (run / "eval.json").write_text(json.dumps({**values, "epoch": epochs}))
        if best is not None:
            (run / "eval_best.json").write_text(json.dumps(best))
        rows = []
        for e in range(epochs):
            rows += [{"step": 10 * e + s, "epoch": e, "train/loss": 0.1 / (e + 1) + s / 1000} for s in (3, 6)]
            if epoch_loss:
                rows.append({"step": 10 * e + 9, "epoch": e + 1, "train/epoch_loss": 0.1 / (e + 1)})
            rows.append({"step": 10 * e + 9, "epoch": e + 1, "val/loss": 0.09 / (e + 1), "test/loss": 0.095 / (e + 1)})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / "command.txt").write_text(f"python launch/train.py --config c.yaml run.name={name}\n")
        for key in ("recon", "eval_recon", "eval_latent_tsne3d"):
            for e in (1, epochs):
                Image.new("RGB", (8, 8), (e * 20, 0, 0)).save(run / "figures" / f"{key}_epoch{e:03d}.png")
        return run

    return make


def _study(tmp_path: Path, claims: list[dict[str, Any]], epochs: int = 3, **extra: Any) -> Path:
    exp = {"title": "Exp A", "epochs": epochs, "data": "Tiny", "shards": ["tiny"], "standins": {"toy": "Toy"},
           "runs": {"a": ["eval_recon", "recon@1", "eval_latent_tsne3d"]}, "claims": claims, **extra}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"title": "T", "experiments": {"A": exp}}))
    return path


A_LT_B = {"text": "a beats b", "lhs": {"run": "a", "metric": "test/mse"}, "op": "<", "rhs": {"run": "b", "metric": "test/mse"}}


def _verdict(study_path: Path, runs: list[Path]) -> tuple[str, str, str]:
    study = load_study(study_path)
    exp = study.experiments["A"]
    v = check_claim(exp.claims[0], exp, group_runs(load_run(r) for r in runs), study)
    return v.status, v.evidence, v.rule


RULE = Rule(spread_factor=2.0, clear_margin=0.5)


def test_decide_needs_a_gap_beyond_twice_the_larger_std() -> None:
    a, b = Stat.of([0.010, 0.011, 0.012]), Stat.of([0.020, 0.021, 0.022])  # std 0.001 each, gap 0.010
    assert decide("<", 1.0, a, b, RULE)[0] == HOLDS
    status, rule = decide(">", 1.0, a, b, RULE)
    assert status == FAILS and rule == "gap 0.01 > 2 x the larger std 0.001 = 0.002"  # the threshold used, printed
    noisy = Stat.of([0.005, 0.015, 0.030])  # mean 0.0167, std 0.0126: the gap to b is within 2 std
    status, rule = decide("<", 1.0, noisy, b, RULE)
    assert status == UNTESTED and "std" in rule
    # No repeats: only a clear gap (> 50 % of the larger side) is decisive.
    assert decide("<", 1.0, Stat.of([0.01]), Stat.of([0.03]), RULE)[0] == HOLDS
    assert decide("<", 1.0, Stat.of([0.019]), Stat.of([0.02]), RULE)[0] == UNTESTED
    assert decide("<", 0.5, Stat.of([0.019]), Stat.of([0.02]), Rule(clear_margin=0.3))[0] == FAILS  # factor scales the rhs


def test_a_side_run_once_against_a_repeated_one_says_its_spread_was_assumed_and_margins_print_as_used() -> None:
    once, repeated = Stat.of([0.010]), Stat.of([0.020, 0.021, 0.022])
    status, rule = decide("<", 1.0, once, repeated, RULE)
    assert status == HOLDS and rule == "gap 0.011 > 2 x the measured std 0.001 = 0.002 (left side run once: its spread taken as the other's)"
    assert decide(">", 1.0, repeated, once, RULE)[1].endswith("(right side run once: its spread taken as the other's)")
    assert "run once" not in decide("<", 1.0, Stat.of([0.010, 0.011]), repeated, RULE)[1]  # both measured: nothing assumed
    # a margin prints as the fraction used (2.5 %), not rounded to another one
    assert decide("<", 1.0, Stat.of([0.019]), Stat.of([0.02]), Rule(margin=0.025))[1] == "no repeats; gap 0.001 > 2.5% of the larger side = 0.0005"


def test_a_run_group_over_two_datasets_is_not_pooled_into_a_verdict(make_run: MakeRun, tmp_path: Path) -> None:
    runs = [make_run("a", metrics={"test/mse": 0.010}), make_run("a-s1", metrics={"test/mse": 0.011}, shards="shards/other"),
            make_run("b", metrics={"test/mse": 0.030}), make_run("b-s1", metrics={"test/mse": 0.031})]
    status, _, why = _verdict(_study(tmp_path, [A_LT_B]), runs)
    assert status == UNTESTED and "the a runs trained on different data (other, tiny)" in why
    with pytest.raises(UserError, match="not both"):
        load_study(_study(tmp_path, [{**A_LT_B, "margin": 0.1, "margin_abs": 0.001, "why": "w"}]))


def test_a_repeated_stat_prints_its_std_at_the_means_precision() -> None:
    # numpy's sample std is the reference; the text shows it at the decimals of the 4-significant mean
    vals = [0.00524, 0.00532]
    st = Stat.of(vals)
    assert st.std == float(np.std(vals, ddof=1))
    assert st.fmt(".4g") == f"{np.mean(vals):.6f} ± {np.std(vals, ddof=1):.6f} (2)" == "0.005280 ± 0.000057 (2)"
    assert Stat.of([11.65, 11.73]).fmt(".4g") == "11.69 ± 0.06 (2)"
    assert Stat.of([0.0099]).fmt(".4g") == "0.0099"  # no repeats: plain significant figures, no std
    assert Stat.of([0.01, 0.02]).fmt(".4f") == "0.0150 ± 0.0071 (2)"  # fixed decimals stay as asked


def test_claim_holds_and_does_not_hold_over_repeats(make_run: MakeRun, tmp_path: Path) -> None:
    runs = [make_run(n, metrics={"test/mse": v}) for n, v in
            [("a", 0.010), ("a-s1", 0.011), ("a-s2", 0.012), ("b", 0.020), ("b-s1", 0.021), ("b-s2", 0.022)]]
    status, evidence, _ = _verdict(_study(tmp_path, [A_LT_B]), runs)
    assert status == HOLDS and "0.01100 ± 0.00100 (3)" in evidence
    status, _, _ = _verdict(_study(tmp_path, [{**A_LT_B, "op": ">"}]), runs)
    assert status == FAILS


def test_claim_not_tested_for_short_schedule_spread_standin_or_missing_run(make_run: MakeRun, tmp_path: Path) -> None:
    runs = [make_run(n, metrics={"test/mse": v}) for n, v in [("a", 0.010), ("b", 0.030)]]
    assert _verdict(_study(tmp_path, [A_LT_B], epochs=3), runs)[0] == HOLDS
    status, _, why = _verdict(_study(tmp_path, [A_LT_B], epochs=20), runs)
    assert status == UNTESTED and "a trained 3 of the source's 20 epochs" in why
    status, _, why = _verdict(_study(tmp_path, [{**A_LT_B, "rhs": {"run": "zz", "metric": "test/mse"}}]), runs)
    assert status == UNTESTED and "run zz missing" in why
    spread = [make_run(n, metrics={"test/mse": v}) for n, v in [("c", 0.01), ("c-s1", 0.03), ("d", 0.025), ("d-s1", 0.026)]]
    claim = {**A_LT_B, "lhs": {"run": "c", "metric": "test/mse"}, "rhs": {"run": "d", "metric": "test/mse"}}
    status, _, why = _verdict(_study(tmp_path, [claim]), spread)
    assert status == UNTESTED and "within 2 x the run-to-run std" in why


def test_mean_and_std_over_repeats_match_numpy_in_the_table(make_run: MakeRun, tmp_path: Path) -> None:
    values = [0.0123, 0.0150, 0.0101]
    runs = [make_run(n, metrics={"test/mse": v}) for n, v in zip(["a", "a-s1", "a-s2"], values)]
    groups = group_runs(load_run(r) for r in runs)
    assert list(groups) == ["a"] and [r.name for r in groups["a"]] == ["a", "a-s1", "a-s2"]
    st = Stat.of([r.value("test/mse") for r in groups["a"]])
    assert st.mean == pytest.approx(np.mean(values)) and st.std == pytest.approx(np.std(values, ddof=1)) and st.n == 3
    text = write_report(runs, tmp_path / "out" / "R.md").read_text()
    assert "| a ×3 | tiny | 3 | bf16 | 2.0 ± 0.0 (3) min | 1,000 ± 0 (3) |" in text
    assert f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f} (3)" in text


def test_an_unfinished_run_is_left_out_of_the_numbers_with_its_progress(make_run: MakeRun, tmp_path: Path) -> None:
    done = make_run("a", metrics={"test/mse": 0.0123})
    partial = make_run("a-s1", epochs=121, metrics={"test/mse": 0.5})
    for f in ("summary.json", "eval.json"):  # killed mid-schedule: no summary, no evaluation yet
        (partial / f).unlink()
    rows = (partial / "metrics.jsonl").read_text().splitlines()
    cut = [i for i, r in enumerate(rows) if "epoch_loss" in r][11]  # 12 epochs done, then a few steps of the 13th
    (partial / "metrics.jsonl").write_text("\n".join(rows[: cut + 3]) + "\n")
    text = write_report([done, partial], tmp_path / "out" / "R.md").read_text()
    assert "| a | tiny | 3 |" in text and "0.5" not in text  # the group holds only the finished run
    assert "left out: a-s1 (12 of 121 epochs)." in text
    # a claim on a run with no finished member says how far it got, not that it is missing
    partial.rename(partial.with_name("b"))
    text = write_report([done, partial.with_name("b")], tmp_path / "out" / "R.md", _study(tmp_path, [A_LT_B])).read_text()
    assert "*not tested here*: a beats b" in text and "run b unfinished (12 of 121 epochs)" in text


def test_loss_curves_put_train_and_val_at_the_same_1_based_epochs(make_run: MakeRun) -> None:
    run = load_run(make_run("a", epochs=4))
    curves, notes = read_curves([run])
    assert [e for e, _ in curves["train/epoch_loss"]] == [e for e, _ in curves["val/loss"]] == [1, 2, 3, 4]
    assert curves["train/epoch_loss"][0][1] == pytest.approx(0.1) and not notes
    old = load_run(make_run("old", epochs=4, epoch_loss=False))  # predates train/epoch_loss: last step value, +1 epoch
    curves, notes = read_curves([old])
    assert curves["train/epoch_loss"] == [(e + 1, pytest.approx(0.1 / (e + 1) + 0.006)) for e in range(4)]
    assert [e for e, _ in curves["val/loss"]] == [1, 2, 3, 4] and "last logged step" in notes[0]
    assert epoch_series(run.rows, "val/loss")[0] == epoch_series(old.rows, "val/loss")[0]


def test_truncated_last_metrics_line_is_skipped_with_a_warning(make_run: MakeRun, caplog: pytest.LogCaptureFixture) -> None:
    run = make_run("crashed")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 40, "epoch": 4, "val/lo')  # what a kill mid-write leaves
    with caplog.at_level(logging.WARNING):
        loaded = load_run(run)
    assert "metrics.jsonl line" in caplog.text and "skipped" in caplog.text
    assert [e for e, _ in epoch_series(loaded.rows, "val/loss")[0]] == [1, 2, 3]


@pytest.mark.parametrize("name,garbage", [("summary.json", '{"epoch": 3, "test/m'), ("eval.json", "\x00\x01"),
                                          ("config.yaml", "data: [shards\n  : {")])
def test_garbled_run_file_is_a_one_line_user_error_naming_it(make_run: MakeRun, name: str, garbage: str) -> None:
    run = make_run("bad")
    (run / name).write_text(garbage)
    with pytest.raises(UserError) as err:
        load_run(run)
    assert name in str(err.value) and "\n" not in str(err.value).strip()


def test_report_cli_exits_2_in_one_line_on_a_garbled_summary(make_run: MakeRun, tmp_path: Path, run_py: Callable) -> None:
    run = make_run("bad")
    (run / "summary.json").write_text("{not json")
    proc = run_py(["launch/report.py", str(run), "--claims", "configs/seeds/claims.yaml", "--out", str(tmp_path / "R.md")])
    assert proc.returncode == 2 and "summary.json" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_report_with_a_study_shows_verdicts_references_best_curves_and_figures(make_run: MakeRun, tmp_path: Path) -> None:
    a = make_run("a", metrics={"test/mse": 0.010, "test_noisy/mse": 0.011, "test_noisy/snr_db": 9.5}, best={"test/mse": 0.009, "epoch": 2})
    b = make_run("b", metrics={"test/mse": 0.030}, group="g2")
    summary = json.loads((a / "summary.json").read_text())
    (a / "summary.json").write_text(json.dumps({**summary, "device": "Xeon Y, 2 cores, amx_bf16"}))
    refs = [{"run": "a", "metric": "first:train/epoch_loss", "label": "initial loss", "source": 0.108}]
    out = write_report([a, b, tmp_path / "never_started"], tmp_path / "docs" / "R.md",
                       claims=_study(tmp_path, [A_LT_B], references=refs)).read_text()
    assert "- **holds**: a beats b [<]" in out and "no repeats; gap 0.02 > 50% of the larger side = 0.015" in out
    assert "Trained on: Xeon Y, 2 cores, amx_bf16 (a); not recorded (run predates summary.json's device) (b)." in out
    assert "| Exp A | a | initial loss (`first:train/epoch_loss`) | 0.108 | 0.1 |" in out
    assert "0.0090 (ep 2)" in out and "noisy: 0.0110 / 9.50 dB" in out  # best checkpoint; corrupted-input column
    figs = tmp_path / "docs" / "figures"
    assert (figs / "loss_curves_g1.png").exists() and (figs / "loss_curves_g2.png").exists()  # single-run groups too
    assert (figs / "a_latent_tsne3d.png").exists() and (figs / "a_train_recon_epoch1.png").exists()
    assert (figs / "a_recon.png").read_bytes() == (a / "figures" / "eval_recon_epoch003.png").read_bytes()  # newest epoch
    assert "python launch/train.py" in out


def test_seed_study_file_loads_and_names_real_runs(tmp_path: Path) -> None:
    study = load_study(ROOT / "configs/seeds/claims.yaml")
    names = {yaml.safe_load(p.read_text())["run"]["name"] for p in (ROOT / "configs/seeds").glob("*.yaml") if p.name != "claims.yaml"}
    used = {s.run for e in study.experiments.values() for c in e.claims for s in (c.lhs, c.rhs) if s.run}
    used |= {r for e in study.experiments.values() for r in e.runs} | {r.run for e in study.experiments.values() for r in e.references}
    assert used and used <= names, used - names
    assert {"eval_latent_tsne3d", "eval_samples"} <= {k for e in study.experiments.values() for ks in e.runs.values() for k in ks}
    with pytest.raises(UserError, match=r"claims\.0\.op"):  # a typo in the study file names the entry
        load_study(_study(tmp_path, [{**A_LT_B, "op": "<<"}]))


def test_runs_reading_finds_the_runs_a_claim_reads_a_split_of_through_any_side_prefix_or_minus(tmp_path: Path) -> None:
    # reproduce.sh scores the train split (a quarter of an hour a run) only for these runs
    claims = [{"text": "gap", "lhs": {"run": "a", "metric": "val/loss", "minus": "train_eval/loss"}, "op": "<",
               "rhs": {"run": "b", "metric": "best:train_eval/mse"}},
              {"text": "mean", "lhs": {"run": "c", "metric": ["test/mse", "train_eval/mse"]}, "op": "<", "rhs": {"value": 1.0}, "why": "w"},
              {"text": "none", "lhs": {"run": "d", "metric": "test/mse"}, "op": "<", "rhs": {"run": "e", "metric": "val/loss"}}]
    assert load_study(_study(tmp_path, claims)).runs_reading("train_eval/") == ["a", "b", "c"]
    seeds = load_study(ROOT / "configs/seeds/claims.yaml").runs_reading("train_eval/")
    assert seeds == ["colored_denoise_ae", "colored_denoise_reg", "stl10_compress", "stl10_dropout"]


def test_report_module_names_no_experiment() -> None:
    """Everything study-specific lives in configs/: no run or group name of the seed configs in the code."""
    names = set()
    for p in (ROOT / "configs/seeds").glob("*.yaml"):
        cfg = yaml.safe_load(p.read_text())
        if "run" in cfg:
            names |= {cfg["run"]["name"], cfg.get("log", {}).get("group") or cfg["run"]["name"]}
    assert len(names) > 10
    for module in ("aedist/report.py", "aedist/study.py", "aedist/runs.py"):
        source = (ROOT / module).read_text()
        found = sorted(n for n in names if re.search(rf"\b{re.escape(n)}\b", source))
        assert not found, f"{module} names experiments {found}"
        assert not re.search(r"seed ?00\d", source, re.IGNORECASE), module


def test_relative_margins_only_on_ratio_scale_and_dB_needs_an_absolute_one(tmp_path: Path) -> None:
    # 8.0 vs 5.0 dB: a 38 % gap of the larger side, but a percentage of decibels means nothing
    out, inp = Stat.of([8.0]), Stat.of([5.0])
    status, rule = decide(">", 1.0, out, inp, Rule(log_scale=True))
    assert status == UNTESTED and "margin_abs" in rule
    assert decide(">", 1.0, out, inp, Rule(log_scale=True, margin_abs=1.0)) == (HOLDS, "no repeats; gap 3 > the stated margin 1")
    assert decide(">", 1.0, Stat.of([5.5]), inp, Rule(log_scale=True, margin_abs=1.0))[0] == UNTESTED
    # a stated relative margin replaces the study's clear_margin on ratio-scale quantities
    assert decide("<", 1.0, Stat.of([0.019]), Stat.of([0.02]), Rule(margin=0.04))[0] == HOLDS
    with pytest.raises(UserError, match="relative margin on a log quantity"):
        load_study(_study(tmp_path, [{**A_LT_B, "lhs": {"run": "a", "metric": "test/snr_db"}, "margin": 0.1, "why": "w"}]))


def test_equivalence_holds_fails_or_stays_open_by_gap_and_spread_band() -> None:
    ref = Stat.of([0.100, 0.102, 0.098])  # std 0.002: band 2 x 0.002 = 0.004; margin 5 % of ~0.1 = 0.005
    status, rule = decide("~=", 1.0, Stat.of([0.1005]), ref, Rule(margin=0.05))
    assert status == HOLDS and "<= margin 5% of the larger side" in rule  # 0.0005 + 0.004 <= 0.005
    assert decide("~=", 1.0, Stat.of([0.1040]), ref, Rule(margin=0.05))[0] == UNTESTED  # 0.004 +- 0.004 straddles 0.0052
    assert decide("~=", 1.0, Stat.of([0.1200]), ref, Rule(margin=0.05))[0] == FAILS  # 0.02 - 0.004 > 0.006
    assert decide("~=", 1.0, Stat.of([0.1]), Stat.of([0.1]), Rule(margin=0.05))[0] == UNTESTED  # no spread measured
    assert decide("~=", 1.0, Stat.of([11.0]), Stat.of([10.9, 11.1]), Rule(margin_abs=0.5, log_scale=True))[0] == HOLDS


def test_stand_in_verdicts_name_the_data_and_scaled_thresholds_are_printed(make_run: MakeRun, tmp_path: Path) -> None:
    toy = [make_run(n, metrics={"test/mse": v}, shards="shards/toy") for n, v in [("ta", 0.010), ("tb", 0.030)]]
    claim = {**A_LT_B, "lhs": {"run": "ta", "metric": "test/mse"}, "rhs": {"run": "tb", "metric": "test/mse"}}
    study = load_study(_study(tmp_path, [claim, {**claim, "op": ">"}, {**claim, "factor": 0.8, "why": "w"}]))
    exp, groups = study.experiments["A"], group_runs(load_run(r) for r in toy)
    held, failed, scaled = (check_claim(c, exp, groups, study) for c in exp.claims)
    assert (held.status, held.on, held.mark) == (HOLDS, "Toy", "**holds on Toy**")
    assert failed.mark == "**does not hold on Toy**"
    # 0.8 x 0.03 = 0.024: the threshold actually compared with, not the unscaled rhs
    assert "threshold 0.8 x 0.03 = 0.024" in scaled.evidence and scaled.status == HOLDS and "gap 0.014 > 50% of the larger side = 0.012" in scaled.rule
    text = write_report(toy, tmp_path / "out" / "R.md", _study(tmp_path, [claim])).read_text()
    assert "**holds on Toy**: a beats b" in text


def test_thresholds_need_a_reason_and_vague_claims_show_numbers_only(make_run: MakeRun, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="needs a why"):
        load_study(_study(tmp_path, [{**A_LT_B, "factor": 1.5}]))
    with pytest.raises(UserError, match="needs a why"):
        load_study(_study(tmp_path, [{**A_LT_B, "rhs": {"value": 3}}]))
    runs = [make_run(n, metrics={"test/mse": v}) for n, v in [("a", 0.010), ("b", 0.030)]]
    vague = _study(tmp_path, [{**A_LT_B, "verdict": False, "why": "the source gives no number"}])
    status, evidence, why = _verdict(vague, runs)
    assert status == SHOWN and why == "the source gives no number" and "0.01" in evidence
    # in the report: the reason once, in the rule text; with a run missing, as the reason for no verdict
    text = write_report(runs, tmp_path / "out" / "R.md", vague).read_text()
    assert text.count("the source gives no number") == 1 and "Why this threshold" not in text
    text = write_report(runs[:1], tmp_path / "out" / "R.md", vague).read_text()
    assert "run b missing). Why no verdict: the source gives no number." in text and "Why this threshold" not in text
    # one run against a threshold stated (and justified) in the study file is judged as it stands
    status, _, why = _verdict(_study(tmp_path, [{**A_LT_B, "rhs": {"value": 0.02}, "why": "w"}]), runs)
    assert status == HOLDS and "threshold stated" in why


def test_combined_sides_tail_share_and_split_eval_files(make_run: MakeRun, tmp_path: Path) -> None:
    run = make_run("a", epochs=10, metrics={"test_rot/decoded_class_acc/Bag": 0.9, "test_rot/decoded_class_acc/Dress": 0.5,
                                            "val/mse": 0.03})
    (run / "eval_train.json").write_text(json.dumps({"train_eval/mse": 0.01}))  # evaluate.py --split train
    r = load_run(run)
    study = load_study(_study(tmp_path, [{"text": "mean of classes", "lhs": {"run": "a", "metric": ["test_rot/decoded_class_acc/Bag",
                       "test_rot/decoded_class_acc/Dress"]}, "op": ">", "rhs": {"value": 0.6}, "why": "w"},
                                         {"text": "gap", "lhs": {"run": "a", "metric": "val/mse", "minus": "train_eval/mse"}, "op": ">",
                                          "rhs": {"value": 0.0}, "why": "w"}], epochs=10))
    exp, groups = study.experiments["A"], group_runs([r])
    mean_v, gap_v = (check_claim(c, exp, groups, study) for c in exp.claims)
    assert "= 0.7 " in mean_v.evidence + " " and mean_v.status == HOLDS
    assert "val/mse - train_eval/mse of a = 0.02" in gap_v.evidence
    # epoch-mean loss 0.1/(e+1): the last 5 of 10 epochs make (0.1/5 - 0.1/10) / (0.1 - 0.1/10) of the whole decrease
    assert r.value("tail5:train/epoch_loss") == pytest.approx((0.1 / 5 - 0.1 / 10) / (0.1 - 0.1 / 10))


def test_report_study_and_runs_import_no_cycle() -> None:
    """report -> study -> runs, never back: each module imports without the one above it."""
    import subprocess
    import sys

    code = ("import sys, aedist.runs; assert 'aedist.study' not in sys.modules and 'aedist.report' not in sys.modules; "
            "import aedist.study; assert 'aedist.report' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    for module, banned in (("aedist/study.py", "aedist.report"), ("aedist/runs.py", "aedist.study"), ("aedist/runs.py", "aedist.report")):
        assert f"from {banned} import" not in (ROOT / module).read_text(), (module, banned)


def test_a_collapsed_run_is_named_under_the_table_and_in_each_verdict_that_uses_it(make_run: MakeRun, tmp_path: Path) -> None:
    # b-s1's best checkpoint gives one image for all inputs (variety 0.01); b and a vary like the data
    runs = [make_run("a", metrics={"test/mse": 0.010, "test/variety": 0.8}),
            make_run("b", metrics={"test/mse": 0.030, "test/variety": 0.7}),
            make_run("b-s1", metrics={"test/mse": 0.031, "test/variety": 0.6}, best={"test/mse": 0.031, "test/variety": 0.01})]
    assert [load_run(r).collapsed() for r in runs] == ["", "", "best 0.010"]
    status, evidence, rule = _verdict(_study(tmp_path, [A_LT_B]), runs)
    assert status == HOLDS and evidence.endswith("; includes a collapsed run: b-s1 (best 0.010)")  # kept in the verdict, and said
    # and what the claim gives without it: b alone, no repeats left (0.01 vs 0.03, gap 0.02 > 50 % of 0.03)
    assert rule.endswith("; without it: holds (test/mse of a = 0.01 vs test/mse of b = 0.03; no repeats; gap 0.02 > 50% of the larger side = 0.015)")
    only_collapsed = [runs[0], make_run("c", metrics={"test/mse": 0.03, "test/variety": 0.0})]
    claim_c = {**A_LT_B, "rhs": {"run": "c", "metric": "test/mse"}}
    assert _verdict(_study(tmp_path, [claim_c]), only_collapsed)[2].endswith("without it: not tested here (test/mse of a = 0.01 vs "
                                                                            "test/mse of c = –; every finished c run collapsed)")
    alone = _study(tmp_path, [{**A_LT_B, "rhs": {"value": 0.02}, "why": "w"}])
    assert "collapsed" not in _verdict(alone, runs)[1]  # a claim on a only
    text = write_report(runs, tmp_path / "out" / "R.md", _study(tmp_path, [A_LT_B])).read_text()
    assert re.search(r"Collapsed \(outputs vary under 5% .*\): b-s1 \(best 0\.010\)\.", text)


def test_records_rebuild_the_same_report_without_the_run_folders(make_run: MakeRun, tmp_path: Path) -> None:
    a = make_run("a", metrics={"test/mse": 0.010}, best={"test/mse": 0.009, "epoch": 2})
    b = make_run("b", metrics={"test/mse": 0.030})
    (a / "checkpoints" / "step_9").mkdir(parents=True)
    (a / "checkpoints" / "step_9" / "model.safetensors").write_bytes(b"weights")
    study, records = _study(tmp_path, [A_LT_B]), tmp_path / "records"
    live = write_report([a, b], tmp_path / "live" / "R.md", study, records=records).read_text()
    assert sorted(p.name for p in (records / "a").iterdir()) == [
        "command.txt", "config.yaml", "eval.json", "eval_best.json", "figures", "metrics.jsonl", "summary.json"]
    # only the figures the report showed (newest eval_recon, recon of epoch 1, newest t-SNE), byte for byte
    assert sorted(p.name for p in (records / "a" / "figures").iterdir()) == [
        "eval_latent_tsne3d_epoch003.png", "eval_recon_epoch003.png", "recon_epoch001.png"]
    assert (records / "a" / "figures" / "recon_epoch001.png").read_bytes() == (a / "figures" / "recon_epoch001.png").read_bytes()
    for run in (a, b):
        for f in ("metrics.jsonl", "summary.json", "eval.json"):
            assert (records / run.name / f).read_bytes() == (run / f).read_bytes()
    for run in (a, b):
        shutil.rmtree(run)
    rebuilt = write_report(sorted(records.iterdir()), tmp_path / "again" / "R.md", study, records=records).read_text()
    assert rebuilt == live and "- **holds**: a beats b" in rebuilt
    assert (tmp_path / "again" / "figures" / "a_recon.png").is_file()  # the figures come from the record
    assert not list(records.glob(".*"))  # no half-built record left beside them


def test_a_record_left_aside_by_an_interrupted_swap_is_put_back_and_reported(make_run: MakeRun, tmp_path: Path,
                                                                               caplog: pytest.LogCaptureFixture) -> None:
    a, b = make_run("a", metrics={"test/mse": 0.010}), make_run("b", metrics={"test/mse": 0.030})
    study, records = _study(tmp_path, [A_LT_B]), tmp_path / "records"
    whole = write_report([a, b], tmp_path / "one" / "R.md", study, records=records).read_text()
    (records / "a").rename(records / ".a.old")  # a crash between save_record's renames: only the old copy is left
    (records / ".a.new").mkdir()  # and a half-built new one
    for run in (a, b):
        shutil.rmtree(run)
    with caplog.at_level(logging.WARNING):
        again = write_report(sorted(records.glob("*/")), tmp_path / "two" / "R.md", study, records=records).read_text()
    assert again == whole and "records/a restored" in caplog.text
    assert sorted(p.name for p in records.iterdir()) == ["a", "b"]


def test_an_eval_file_of_an_older_checkpoint_is_left_out_with_a_warning(make_run: MakeRun, caplog: pytest.LogCaptureFixture) -> None:
    run = make_run("a", metrics={"test/mse": 0.010}, best={"test/mse": 0.009, "epoch": 2})
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "step": 30, "best_epoch": 2}))
    (run / "eval.json").write_text(json.dumps({"test/mse": 0.5, "checkpoint_step": 20}))  # scored before 10 more steps
    with caplog.at_level(logging.WARNING):
        loaded = load_run(run)
    assert loaded.value("test/mse") == 0.010 and loaded.value("best:test/mse") == 0.009  # the summary's own number
    assert "scored checkpoint_step 20, but the run's last checkpoint is at 30" in caplog.text
    (run / "eval.json").write_text(json.dumps({"test/mse": 0.5, "checkpoint_step": 30}))
    (run / "eval_best.json").write_text(json.dumps({"test/mse": 0.4, "epoch": 1}))
    loaded = load_run(run)
    assert loaded.value("test/mse") == 0.5 and loaded.value("best:test/mse") is None


def test_a_finished_record_outranks_an_unfinished_run_of_its_name_and_a_later_one_wins_otherwise(
        make_run: MakeRun, tmp_path: Path) -> None:
    record = make_run("a", metrics={"test/mse": 0.010})
    records = tmp_path / "records"
    (records / "a").parent.mkdir()
    record.rename(records / "a")
    resumed = make_run("a", metrics={"test/mse": 0.090})  # runs/a again, being trained further: no summary yet
    (resumed / "summary.json").unlink()
    b = make_run("b", metrics={"test/mse": 0.030})
    study = _study(tmp_path, [A_LT_B])
    text = write_report([records / "a", resumed, b], tmp_path / "o1" / "R.md", study, records=records).read_text()
    assert "- **holds**: a beats b" in text and "0.0100" in text
    assert json.loads((records / "a" / "summary.json").read_text())["test/mse"] == 0.010  # the record was kept
    (resumed / "summary.json").write_text(json.dumps({"completed": True, "epoch": 3, "test/mse": 0.090}))
    (resumed / "eval.json").write_text(json.dumps({"test/mse": 0.090}))
    text = write_report([records / "a", resumed, b], tmp_path / "o2" / "R.md", study, records=records).read_text()
    assert "- **does not hold**: a beats b" in text
    assert json.loads((records / "a" / "summary.json").read_text())["test/mse"] == 0.090  # replaced by the finished run


def test_run_records_are_committed_and_run_folders_are_not() -> None:
    """docs/runs/ holds the study's only lasting copy of its runs: an ignore rule that also caught it (``runs/``
    did) leaves the records on the machine that made them, and they are lost with it."""
    import subprocess

    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")

    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT).returncode == 0  # the rules alone

    assert not ignored("docs/runs/a_new_run/summary.json") and not ignored("docs/runs/a_new_run/eval.json")
    assert ignored("runs/fashion_baseline/summary.json") and ignored("runs/fashion_baseline/checkpoints/step-1/model.safetensors")
    assert ignored("docs/runs/.a_new_run.new/summary.json")  # a record save_record is still building
    tracked = subprocess.run(["git", "ls-files", "docs/runs"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert "docs/runs/README.md" in tracked
