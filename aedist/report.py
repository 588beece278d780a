"""The results report over finished runs: one Markdown table, claims checked, figures, commands.

    python launch/report.py runs/* --out docs/RESULTS.md
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from aedist.errors import UserError

COLUMNS = ["run", "dataset", "epochs", "test MSE", "PSNR / SNR dB", "corrupted-input MSE", "kNN acc", "wall", "img/s"]


def _load_run(run: Path) -> dict:
    """config + summary + eval of one run folder (eval.json wins over the end-of-training numbers)."""
    info = {"name": run.name, "path": run, "config": yaml.safe_load((run / "config.yaml").read_text())}
    for part in ("summary", "eval"):
        path = run / f"{part}.json"
        info[part] = json.loads(path.read_text()) if path.exists() else {}
    info["values"] = {**info["summary"], **info["eval"]}
    cmd = run / "command.txt"  # one line per (re)start: a resumed or extended run lists each command once
    info["command"] = "\n".join(dict.fromkeys(cmd.read_text().splitlines())) if cmd.exists() else ""
    return info


def _fmt(v: float | None, spec: str = ".4f") -> str:
    return "–" if v is None else format(v, spec)


def _row(info: dict) -> list[str]:
    v, cfg = info["values"], info["config"]
    corrupted = [(k.split("/")[0].removeprefix("test_"), x) for k, x in sorted(v.items())
                 if k.startswith("test_") and k.endswith("/mse") and "/input" not in k]
    shards = Path(cfg["data"]["shards"]).name
    return [
        info["name"], shards, str(v.get("epoch", "–")), _fmt(v.get("test/mse")),
        f"{_fmt(v.get('test/psnr_db'), '.2f')} / {_fmt(v.get('test/snr_db'), '.2f')}",
        ", ".join(f"{name} {_fmt(x)}" for name, x in corrupted) or "–",
        _fmt(v.get("test/knn_acc"), ".3f"),
        f"{v['train_seconds'] / 60:.1f} min" if "train_seconds" in v else "–",
        _fmt(v.get("img_per_s"), ",.0f"),
    ]


def _claims(runs: dict[str, dict]) -> list[str]:
    """The seeds' claims, checked with numbers from whichever runs are present."""
    out = []

    def get(name: str, key: str) -> float | None:
        return runs.get(name, {}).get("values", {}).get(key)

    def claim(text: str, ok: bool, detail: str) -> None:
        out.append(f"- {'holds' if ok else '**does not hold**'}: {text} ({detail})")

    a, b = get("fashion_rotated", "test_rotated/mse"), get("fashion_baseline", "test_rotated/mse")
    if a is not None and b is not None:
        claim("seed 000: training on rotated copies lowers the error on rotated test inputs", a < 0.8 * b,
              f"rotated-input MSE {a:.4f} vs baseline {b:.4f}, ratio {a / b:.2f}")
    a, b = get("fashion_rotated", "test_rotated/decoded_class_acc"), get("fashion_baseline", "test_rotated/decoded_class_acc")
    if a is not None and b is not None:
        claim("seed 000: decoded rotated images keep their class (kNN on train latents of clean images)", a > b,
              f"class kept {a:.3f} (rotation-trained) vs {b:.3f} (baseline)")
    for name, info in sorted(runs.items()):
        v = info["values"]
        if "test_noisy/snr_db" in v and "test_noisy/input_snr_db" in v:
            claim(f"{name}: the denoised output's SNR beats the noisy input's", v["test_noisy/snr_db"] > v["test_noisy/input_snr_db"],
                  f"{v['test_noisy/snr_db']:.2f} dB vs {v['test_noisy/input_snr_db']:.2f} dB; "
                  f"on clean inputs the model reconstructs at {v.get('test/snr_db', float('nan')):.2f} dB")
    plain, norm, drop = (get(f"stl10_{v}", "test/mse") for v in ("compress", "norm", "dropout"))
    if plain is not None and norm is not None:
        claim("seed 001: normalizing the input does not improve the test error", norm >= plain,
              f"test MSE in pixel space {norm:.4f} (normalized) vs {plain:.4f} (plain)")
    if plain is not None and drop is not None:
        claim("seed 001: dropout improves the test error", drop < plain, f"test MSE {drop:.4f} (dropout) vs {plain:.4f} (plain)")
    for vae, ae in [("fashion_vae", "fashion_ae"), ("colored_denoise_vae", "colored_denoise_ae")]:
        a, b = get(vae, "test/latent_kl"), get(ae, "test/latent_kl")
        if a is not None and b is not None:
            claim(f"{vae}: the VAE's latent is closer to N(0, I) than {ae}'s", a < b,
                  f"KL of a fitted diagonal Gaussian to N(0, I): {a:.3f} vs {b:.3f}")
    return out


def write_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """One Markdown table over the runs, the claims check, key figures and the exact commands."""
    from aedist import visuals

    out = Path(out)
    fig_dir = out.parent / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    runs = {}
    for r in run_dirs:
        r = Path(r)
        if (r / "config.yaml").exists():
            runs[r.name] = _load_run(r)
    if not runs:
        raise UserError("no run folders given (each needs config.yaml); pass runs/NAME ...")
    lines = ["# Results", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_row(info)) + " |" for info in runs.values()]
    lines += ["", "## Claims of the seeds, checked", "", *(_claims(runs) or ["- (no run pair to compare)"]), ""]
    groups: dict[str, dict[str, dict]] = {}  # one comparison plot per W&B group (seed), e.g. 001's four variants
    for name, info in runs.items():
        if c := _curves(info["path"]):
            groups.setdefault(info["config"]["log"].get("group") or "runs", {})[name] = c
    plotted = [g for g, curves in sorted(groups.items()) if len(curves) > 1]
    if plotted:
        lines += ["## Loss curves", ""]
    for group in plotted:
        visuals.save_png(visuals.loss_curves(groups[group], f"{group}: train / val / test loss"), fig_dir / f"loss_curves_{group}.png")
        lines += [f"![{group} loss curves](figures/loss_curves_{group}.png)", ""]
    lines += ["## Figures", ""]
    for name in runs:
        figs = sorted((runs[name]["path"] / "figures").glob("*.png"))
        latest: dict[str, Path] = {}
        for f in figs:
            latest[f.stem.rsplit("_epoch", 1)[0]] = f  # sorted, so the last epoch wins
        keep = [k for k in ("eval_recon", "eval_recon_rotated", "eval_rotation_panel", "eval_latent", "eval_latent_tsne",
                            "eval_interpolation", "eval_recon_noisy", "eval_recon_rot90", "eval_recon_jigsaw",
                            "eval_prior_samples") if k in latest]
        first = runs[name]["path"] / "figures" / "recon_epoch001.png"
        if keep:
            lines.append(f"**{name}**")
            lines.append("")
            if first.exists():  # seeds 002/003 compare reconstructions after the first and the last epoch
                (fig_dir / f"{name}_recon_epoch1.png").write_bytes(first.read_bytes())
                lines.append(f"![{name} reconstructions after epoch 1](figures/{name}_recon_epoch1.png)")
            for k in keep:
                dst = fig_dir / f"{name}_{k.removeprefix('eval_')}.png"
                dst.write_bytes(latest[k].read_bytes())
                lines.append(f"![{name} {k}](figures/{dst.name})")
            lines.append("")
    lines += ["## Exact commands", "", "```"] + [info["command"] for info in runs.values() if info["command"]] + ["```", ""]
    out.write_text("\n".join(lines))
    return out


def _curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch train/val/test loss from metrics.jsonl."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return {}
    curves: dict[str, list[tuple[int, float]]] = {"train/loss": [], "val/loss": [], "test/loss": []}
    last_train: dict[int, float] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row and isinstance(row["train/loss"], float):
            last_train[row["epoch"]] = row["train/loss"]
        for key in ("val/loss", "test/loss"):
            if isinstance(row.get(key), float):
                curves[key].append((row["epoch"], row[key]))
    curves["train/loss"] = sorted(last_train.items())
    return {k: v for k, v in curves.items() if v}
