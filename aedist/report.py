"""The results report over finished runs: a table, a study's claims checked, loss curves, figures, commands.

    python launch/report.py docs/runs/* runs/* --claims configs/seeds/claims.yaml --out docs/RESULTS.md --records docs/runs

This module knows run folders only. Everything about a study (which runs answer which claim, the
source's schedule, data and own numbers, which figures to show) is data in the study file; its
format is described at the top of configs/seeds/claims.yaml. Runs named NAME-sK repeat NAME with
another training seed and are reported together as mean ± std (n). With ``records``, each finished
run's record (its small files and the figures shown, see runs.save_record) is written there, so the
report can be rebuilt from a clone that never had the run folders.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from aedist.errors import UserError
from aedist.runs import COLLAPSED, CURVE_KEYS, Run, epoch_series, group_runs, is_number, latest_runs, load_run, restore_records, save_record
from aedist.study import SHOWN, Experiment, Stat, Study, check_claim, data_of, group_stat, load_study, percent

log = logging.getLogger(__name__)
def _progress(run: Run) -> str:
    """How far an unfinished run got: its finished epochs (those with an epoch-mean loss) of the schedule."""
    done = len(epoch_series(run.rows, "train/epoch_loss")[0])
    return f"{done} of {run.section('train').get('epochs', '?')} epochs"


def _cell(st: Stat | None, spec: str = ".4f", unit: str = "") -> str:
    return "–" if st is None else st.fmt(spec) + unit


def _row(base: str, members: list[Run], exp: Experiment | None) -> list[str]:
    g = lambda metric: group_stat(members, metric)  # noqa: E731
    first = members[0]
    epochs = "/".join(sorted({str(m.summary.get("epoch", "?")) for m in members}))
    best_eps = ",".join(sorted({str(m.evals["best"]["epoch"]) for m in members if "epoch" in m.evals["best"]}))
    corrupted = sorted({k.split("/")[0] for k in {**first.summary, **first.evals["last"]}  # test_ema/ is a weight set, not a corruption
                        if re.fullmatch(r"test_\w+/mse", k) and not k.startswith(("test_ema/", "test_ema_"))})
    minutes = Stat.of([m.summary["train_seconds"] / 60 for m in members]) if all(is_number(m.summary.get("train_seconds")) for m in members) else None
    return [
        _md(base) if len(members) == 1 else f"{_md(base)} ×{len(members)}",
        data_of(exp, first)[1] if exp else first.shards,
        epochs + (f" / {exp.epochs}" if exp else ""),
        ",".join(sorted({m.precision for m in members})),
        _cell(minutes, ".1f", " min"), _cell(g("img_per_s"), ",.0f"),
        _cell(g("test/mse")),
        _cell(g("best:test/mse")) + (f" (ep {best_eps})" if best_eps else ""),
        f"{_cell(g('test/psnr_db'), '.2f')} / {_cell(g('test/snr_db'), '.2f')}",
        "; ".join(f"{c.removeprefix('test_')}: {_cell(g(f'{c}/mse'))} / {_cell(g(f'{c}/snr_db'), '.2f')} dB" for c in corrupted) or "–",
        _cell(g("test/knn_acc"), ".3f"),
    ]


COLUMNS = ["run", "data", "epochs (/ source's)", "precision", "train time", "img/s", "test MSE: clean in → clean target",
           "test MSE, best checkpoint (epoch)", "PSNR / SNR dB, clean in", "corrupted in → clean target: MSE / SNR", "kNN acc"]


def _md(text: str) -> str:
    """``text`` as one Markdown table cell or inline run: a '|' would split the cell, a newline end the
    table, a backtick or '*' open code or emphasis ('_' inside a word does not). Run folder names come from the file system, which
    allows all of these even where run.name does not."""
    return re.sub(r"([|`*\[\]<>\\])", r"\\\1", " ".join(text.split()))


def _file_stem(name: str) -> str:
    """``name`` made safe as a file name and a Markdown link target (no spaces, brackets, '|')."""
    return re.sub(r"[^\w.-]", "_", name)


def _table(head: list[str], rows: Iterable[list[str]]) -> list[str]:
    cell = lambda c: re.sub(r"(?<!\\)\|", r"\\|", " ".join(c.split()))  # noqa: E731 - cells hold Markdown: escape only what breaks the table
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(map(cell, r)) + " |" for r in rows), ""]


def _figure_path(run: Run, key: str) -> Path | None:
    """``KEY`` -> the newest ``figures/KEY_epochNNN.png``; ``KEY@N`` -> the one of epoch N."""
    name, _, at = key.partition("@")
    found = {int(p.stem.rsplit("_epoch", 1)[1]): p for p in (run.path / "figures").glob(f"{name}_epoch*.png")
             if p.stem.rsplit("_epoch", 1)[1].isdigit() and p.stem.rsplit("_epoch", 1)[0] == name}
    if at:
        return found.get(int(at)) if at.isdigit() else None
    return found[max(found)] if found else None


def _figures(run: Run, keys: list[str], fig_dir: Path, shown: list[Path]) -> list[str]:
    """The figure lines of ``run``; each source PNG used is appended to ``shown`` (for its record)."""
    lines = [f"**{_md(run.name)}**", ""]
    for key in keys:
        src = _figure_path(run, key)
        name, _, at = key.partition("@")
        stem = (name.removeprefix("eval_") if name.startswith("eval_") else f"train_{name}") + (f"_epoch{at}" if at else "")
        if src is None:
            lines.append(f"- figure `{key}` not found in {run.path}/figures (evaluate the run: python launch/evaluate.py {run.path})")
            continue
        (fig_dir / f"{_file_stem(run.name)}_{stem}.png").write_bytes(src.read_bytes())
        shown.append(src)
        lines.append(f"![{_md(run.name)} {key}](figures/{_file_stem(run.name)}_{stem}.png)")
    return [*lines, ""]


def read_curves(members: Sequence[Run]) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    """Per-epoch train (epoch mean) / val / test loss of a run, or the mean over its repeats at the
    epochs all of them logged; plus notes on fallbacks."""
    out, notes = {}, []
    for key in CURVE_KEYS:
        series = [epoch_series(m.rows, key) for m in members]
        notes += sorted({f"{members[0].name}: {n}" for _, n in series if n})
        if series and all(pts for pts, _ in series):
            common = set.intersection(*(set(dict(pts)) for pts, _ in series))
            out[key] = [(e, float(np.mean([dict(pts)[e] for pts, _ in series]))) for e in sorted(common)]
    return out, notes


def write_report(run_dirs: Iterable[str | Path], out: str | Path, claims: str | Path | None = None,
                 records: str | Path | None = None) -> Path:
    """The Markdown report over ``run_dirs`` (folders without config.yaml are skipped; of two folders
    with one name, see runs.latest_runs), checked against the study file ``claims`` when given; figures
    are copied next to ``out`` in figures/, and each finished run's record into ``records`` when given."""
    study = load_study(claims) if claims else Study()
    dirs = [Path(d) for d in run_dirs]
    for put_back in restore_records(Path(records)) if records else []:
        log.warning("%s restored: an interrupted record update had left it aside", put_back)
        dirs.insert(0, put_back)  # the caller's docs/runs/*/ could not list it; its live run, listed later, still wins
    runs = []
    for d in dirs:
        if (d / "config.yaml").is_file():
            runs.append(load_run(d))
        else:
            log.warning("%s has no config.yaml (not started?); left out", d)
    if not runs:
        raise UserError("no run folders given (each needs config.yaml); pass runs/NAME ...")
    runs = latest_runs(runs)
    groups = group_runs(r for r in runs if r.summary)
    unfinished = {r.name: _progress(r) for r in runs if not r.summary}
    exp_of = {run: exp for exp in study.experiments.values() for run in
              [*exp.runs, *(s.run for c in exp.claims for s in (c.lhs, c.rhs) if s.run), *(r.run for r in exp.references)]}
    order = [*dict.fromkeys([*(r for r in exp_of if r in groups), *groups])]
    out = Path(out)
    fig_dir = out.parent / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)

    k, m = study.spread_factor, study.clear_margin
    lines = [f"# {study.title}", "", study.intro.strip(), "", "## Runs", "",
             "Numbers are mean ± std (n) where a run was repeated with other training seeds (NAME-s1, NAME-s2 …); "
             "test MSE compares the output with the clean test image for a clean input; the corrupted-input column "
             "feeds each of the run's `eval.corruptions` (e.g. noisy = Gaussian noise) and still compares with the "
             "clean image. \"last\" is the newest checkpoint (eval.json), \"best\" the lowest validation loss "
             "(eval_best.json); train time excludes evaluation.", ""]
    lines += _table(COLUMNS, (_row(b, groups[b], exp_of.get(b)) for b in order))
    machines: dict[str, list[str]] = {}  # train time and img/s are of the machine a run trained on
    for r in (r for b in order for r in groups[b]):
        machines.setdefault(str(r.summary.get("device") or "not recorded (run predates summary.json's device)"), []).append(_md(r.name))
    lines += ["Trained on: " + "; ".join(f"{d} ({', '.join(names)})" for d, names in machines.items()) + ".", ""]
    collapsed = {r.name: why for b in order for r in groups[b] if (why := r.collapsed())}
    if collapsed:
        lines += [f"Collapsed (outputs vary under {COLLAPSED:.0%} as much as the targets from image to image, `test/variety`: "
                  f"the model gives about one image for every input): {', '.join(f'{_md(n)} ({w})' for n, w in collapsed.items())}. "
                  "Their numbers stay in the means and verdicts above and below, and each verdict that uses one says so.", ""]
    if unfinished:
        lines += [f"Unfinished (no summary.json; they resume where they stopped), left out: {', '.join(f'{_md(n)} ({p})' for n, p in unfinished.items())}.", ""]
    refs = [(exp, r) for exp in study.experiments.values() for r in exp.references]
    if refs:
        lines += ["## The sources' own numbers beside ours", ""]
        rows = []
        for exp, r in refs:
            members = groups.get(r.run, [])
            st = group_stat(members, r.metric) if members else None
            caveat = [] if not members else [data_of(exp, members[0])[1]] + [
                f"{ep} of {exp.epochs} epochs" for ep in {m.summary.get('epoch') for m in members} if ep != exp.epochs]
            rows.append([exp.title, r.run, f"{r.label} (`{r.metric}`)", f"{r.source:g}", _cell(st, ".4g"), "; ".join([r.note, *caveat]).strip("; ")])
        lines += _table(["experiment", "run", "quantity", "source", "ours", "note"], rows)
    if study.experiments:
        lines += ["## Claims, checked", "",
                  f"Each claim is the source's own, checked on our runs. A comparison *holds* or *does not hold* where its gap "
                  f"exceeds {k:g} x the larger std over repeated training seeds (a side run once is taken to vary as much as the "
                  f"repeated one, and the verdict says so); where neither side is repeated, where it exceeds "
                  f"the margin the study file states for it (relative for ratio-scale quantities such as MSE, absolute for dB) or, "
                  f"for ratio-scale quantities, {percent(m)} of the larger side; a single run against a threshold stated in the study "
                  f"file is judged as it stands. An equivalence (≈, within a stated margin) holds where the gap plus the spread "
                  f"band stays inside the margin. Every rule prints the numbers it used. A run on a stand-in dataset gets a verdict "
                  f"that names it (\"holds on …\"); a run short of the source's schedule leaves the claim *not tested here*; "
                  f"*numbers only* marks a claim too vague to judge, with the reason.", ""]
    for exp in study.experiments.values():
        lines += [f"### {exp.title}", "", f"Source: {exp.source or '–'}; {exp.epochs} epochs on {exp.data}.", ""]
        lines += [*(f"- Disclosure: {d.strip()}" for d in exp.disclosures), *([""] if exp.disclosures else [])]
        for claim in exp.claims:
            v = check_claim(claim, exp, groups, study, unfinished)
            op = {"~=": "≈"}.get(claim.op, claim.op)
            # a numbers-only claim's why says why it has no verdict; its rule text carries it once the runs exist
            why = ("Why this threshold", claim.why) if claim.verdict else ("Why no verdict", claim.why if v.status != SHOWN else "")
            extra = "".join(f" {label}: {text.strip().rstrip('.')}." for label, text in (why, ("Note", claim.note)) if text)
            lines.append(f"- {v.mark}: {claim.text} [{op}] ({v.evidence}; {v.rule}).{extra}")
        lines.append("")

    from aedist import visuals  # matplotlib and torch: only once there is something to draw

    by_group: dict[str, list[str]] = {}
    for b in order:
        by_group.setdefault(str(groups[b][0].section("log").get("group") or "ungrouped"), []).append(b)
    lines += ["## Loss curves", "", "Per epoch: train = epoch-mean training loss, val and test = loss after that epoch.", ""]
    for group, bases in by_group.items():
        curves, notes = {}, []
        for b in bases:
            c, n = read_curves(groups[b])
            notes += n
            if c:
                curves[b if len(groups[b]) == 1 else f"{b} (mean of {len(groups[b])})"] = c
        if curves:
            name = "loss_curves_" + re.sub(r"[^\w.-]", "_", group) + ".png"
            visuals.save_png(visuals.loss_curves(curves, f"{group}: loss per epoch"), fig_dir / name)
            lines += [f"![{group} loss curves](figures/{name})", "", *(f"- {n}" for n in notes), ""]
    lines += ["## Figures", ""]
    shown: dict[str, list[Path]] = {}
    for b in order:
        exp = exp_of.get(b)
        keys = exp.runs.get(b) if exp and b in exp.runs else sorted(
            {p.stem.rsplit("_epoch", 1)[0] for p in (groups[b][0].path / "figures").glob("eval_*_epoch*.png")})
        lines += _figures(groups[b][0], list(keys or []), fig_dir, shown.setdefault(groups[b][0].name, [])) if keys else []
    commands = [r.command for b in order for r in groups[b] if r.command]
    lines += ["## Exact commands", "", "```", *commands, "```", ""]
    out.write_text("\n".join(lines))
    for r in (r for b in order for r in groups[b]) if records else ():
        save_record(r, Path(records), shown.get(r.name, []))
    return out
