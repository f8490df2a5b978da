"""The run's plots: the sweep per pack, recovery, mask overlap (PNG, written atomically)."""
from __future__ import annotations

import re
import statistics
from pathlib import Path


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


def write_plots(results: dict, plot_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from packager.figures import save_png

    plot_dir.mkdir(parents=True, exist_ok=True)
    config = results["setup"]["config"]
    written = []
    for pack in dict.fromkeys(r["pack"] for r in results["sweep"]):
        rows = [r for r in results["sweep"] if r["pack"] == pack and "error" not in r]
        parent_chrf = results["parent"]["packs"][pack]["mean"]["chrf++"]
        fig, axes = plt.subplots(2, len(config["allocations"]), figsize=(4.2 * len(config["allocations"]), 6.4),
                                 sharex=True, squeeze=False)
        for col, allocation in enumerate(config["allocations"]):
            for ranker in config["rankers"]:
                sel = sorted((r for r in rows if r["ranker"] == ranker and r["allocation"] == allocation), key=lambda r: r["drop"])
                xs = [100 * r["drop"] for r in sel]
                axes[0][col].plot(xs, [r["mean"]["chrf++"] for r in sel], marker="o", label=ranker)
                axes[1][col].plot(xs, [100 * r["mean"]["error_rate"] for r in sel], marker="o", label=ranker)
            if parent_chrf is not None:
                axes[0][col].axhline(parent_chrf, color="black", linestyle=":", label="parent")
            axes[0][col].set_title(f"{pack}: {allocation}")
            axes[0][col].set_ylabel("chrF++")
            axes[1][col].set_ylabel("generation errors (%)")
            axes[1][col].set_xlabel("experts dropped (%)")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = plot_dir / f"sweep-{slug(pack)}.png"
        save_png(fig, path)
        written.append(path)
    recovery = results["recovery"]
    main_rows = [r for r in recovery["rows"] if "pruned" in r]
    if main_rows:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        xs = [100 * r["drop"] for r in main_rows]
        for key, label in (("pruned", "no recovery"), ("references", "SFT on references"), ("parent", "distillation")):
            ax.plot(xs, [r[key]["mean"]["chrf++"] for r in main_rows], marker="o", label=label)
        ax.axhline(results["parent"]["packs"][recovery["pack"]]["mean"]["chrf++"], color="black", linestyle=":", label="parent")
        ax.set_xlabel("experts dropped (%)")
        ax.set_ylabel("chrF++")
        ax.set_title(f"recovery, {recovery['pack']}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = plot_dir / "recovery.png"
        save_png(fig, path)
        written.append(path)
    overlap = [r for r in results["overlap"] if "error" not in r]
    if overlap:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        labels = [f"{100 * r['drop']:g}% {r['allocation']}" for r in overlap]
        pairwise = [statistics.mean(p["iou"] for p in r["pairwise"]) for r in overlap]
        random_pw = [statistics.mean(p["random_iou"] for p in r["pairwise"]) for r in overlap]
        xs = range(len(overlap))
        ax.bar([x - 0.2 for x in xs], pairwise, width=0.4, label="language masks (mean pairwise IoU)")
        ax.bar([x + 0.2 for x in xs], random_pw, width=0.4, label="random masks, same sizes")
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_ylabel("global IoU")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = plot_dir / "overlap.png"
        save_png(fig, path)
        written.append(path)
    return written
