"""Pictures, plots, a GIF and one report.html (relative links: opens from disk, no server) for `eval`."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from procgenie.atomic import write_atomic, write_bytes_atomic
from procgenie.metrics import psnr, ssim
from procgenie.video import upscale
from procgenie.vocab import ACTION_NAMES, NUM_ACTIONS


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    _plt().close(fig)


def frame_rows(path: Path, rows: list[tuple[str, np.ndarray]], titles: list[list[str]] | None = None) -> None:
    """A grid: one labelled row per (label, frames (M, H, W, C)), optional per-frame titles."""
    plt = _plt()
    M = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(len(rows), M, figsize=(1.3 * M, 1.45 * len(rows)), squeeze=False)
    for i, (label, frames) in enumerate(rows):
        for j in range(M):
            ax = axes[i, j]
            ax.set_xticks([]), ax.set_yticks([])
            if j < len(frames):
                ax.imshow(frames[j], interpolation="nearest")
                if titles and titles[i] and j < len(titles[i]):
                    ax.set_title(titles[i][j], fontsize=7)
            else:
                ax.axis("off")
        axes[i, 0].set_ylabel(label, fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def write_report(
    out: Path, m: dict, clips, recon, gen, gen_rand, one, code_hist, confusion, gen_play=None, latent_rows=None
) -> None:
    plt = _plt()
    C, H = m["dynamics"]["context"], m["dynamics"]["horizon"]
    n = min(8, len(clips))

    # Reconstruction grid: originals above reconstructions.
    orig, rec = clips[:n, C], recon[:n, C]
    frame_rows(
        out / "recon_grid.png",
        [("original", orig), ("reconstruction", rec)],
        [[], [f"{p:.1f} dB" for p in psnr(rec, orig)]],
    )

    # Codebook usage histogram.
    fig, ax = plt.subplots(figsize=(7, 3))
    order = np.sort(code_hist)[::-1]
    ax.bar(np.arange(len(order)), order, width=1.0, color="#4a7ab5")
    ax.set_yscale("log")
    ax.set_xlabel("code, most used first")
    ax.set_ylabel("count")
    t = m["tokenizer"]
    ax.set_title(
        f"codebook usage: {t['codebook_used']}/{t['codebook_size']} codes used, perplexity {t['perplexity']:.0f}"
    )
    _save(fig, out / "codebook_usage.png")

    # Single-step predictions (teacher-forced): last real frame | prediction | truth.
    last, pred, truth = (a[:: max(1, len(a) // 6)][:6] for a in one)
    rows = [("last real", last), ("predicted", pred), ("real next", truth)]
    frame_rows(
        out / "single_step.png",
        rows,
        [[], [f"{p:.1f} dB / {s:.2f}" for p, s in zip(psnr(pred, truth), ssim(pred, truth))], []],
    )

    # Multi-step rollouts: real future, dream under inferred actions, dream under random actions.
    rows, titles = [], []
    for i in range(min(3, len(clips))):
        rows += [
            (f"clip {i} real", clips[i, C - 1 :]),
            ("dream", np.concatenate([clips[i, C - 1 : C], gen[i]])),
            ("random acts", np.concatenate([clips[i, C - 1 : C], gen_rand[i]])),
        ]
        titles += [
            ["context"] + [f"t+{k + 1}" for k in range(H)],
            [""] + [f"{p:.1f}" for p in psnr(gen[i], clips[i, C:])],
            [],
        ]
        if gen_play is not None:
            rows.append(("play's keys", np.concatenate([clips[i, C - 1 : C], gen_play[i]])))
            titles.append([""] + [f"{p:.1f}" for p in psnr(gen_play[i], clips[i, C:])])
    frame_rows(out / "multi_step.png", rows, titles)

    # Each latent action held from the first clip's context: what each number key of play does.
    if latent_rows is not None:
        held = m["dynamics"]["held_latents"]
        frame_rows(
            out / "held_latents.png",
            [(f"latent {k}", np.concatenate([clips[0, C - 1 : C], latent_rows[k]])) for k in range(len(held))],
            [["context"] + [""] * (H - 1) + [f"dx {h['dx_px']:+.0f} dy {h['dy_px']:+.0f}"] for h in held],
        )

    # Error accumulation over the horizon.
    steps = np.arange(1, H + 1)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4))
    d = m["dynamics"]
    a1.plot(steps, d["psnr_by_step"], "o-", label="world model (inferred actions)")
    a1.plot(steps, m["random_actions"]["psnr_by_step"], "s--", label="world model (random actions)")
    if m.get("play"):
        a1.plot(steps, m["play"]["psnr_by_step"], "d-", label=f"play ({m['play']['action_kind']} keys)")
    a1.plot(steps, m["baseline_copy_last"]["psnr_by_step"], "x:", label="copy last frame")
    a1.set_xlabel("steps after the context")
    a1.set_ylabel("PSNR (dB)")
    a1.legend(fontsize=8)
    a1.set_title("PSNR by rollout step")
    a2.plot(steps, d["ssim_by_step"], "o-")
    a2.set_xlabel("steps after the context")
    a2.set_ylabel("SSIM")
    a2.set_title("SSIM by rollout step")
    fig.tight_layout()
    _save(fig, out / "psnr_by_step.png")

    # Latent vs real actions (a dataset without actions has none to compare with).
    if confusion is not None:
        fig, ax = plt.subplots(figsize=(5, 5))
        share = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
        ax.imshow(share, cmap="viridis", aspect="auto", vmin=0, vmax=1)
        ax.set_yticks(range(NUM_ACTIONS), ACTION_NAMES, fontsize=7)
        ax.set_xticks(range(confusion.shape[1]))
        ax.set_xlabel("latent action")
        ax.set_title(f"real vs latent actions (row shares), NMI {m['lam']['nmi_real_actions']:.3f}")
        _save(fig, out / "lam_confusion.png")

    # A GIF: real on the left, dream on the right, context frames first.
    import imageio.v2 as imageio

    k = min(4, len(clips))
    real_seq = clips[:k]  # (k, C+H, ...)
    dream_seq = np.concatenate([clips[:k, :C], gen[:k]], 1)
    tiles = np.concatenate([real_seq, np.full_like(real_seq[:, :, :, :2], 255), dream_seq], 3)  # side by side
    movie = upscale(np.concatenate(list(tiles), 1), 2)  # clips stacked vertically
    write_atomic(out / "rollout.gif", lambda tmp: imageio.mimsave(tmp, list(movie), format="GIF", duration=0.2, loop=0))

    write_bytes_atomic(out / "report.html", _html(m).encode())


def _table(d: dict) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in d.items())
    return f"<table>{rows}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    if isinstance(v, dict):
        return "; ".join(f"{html.escape(str(k))}: {_fmt(x)}" for k, x in v.items())
    return html.escape(str(v))


STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0}td{border:1px solid #ccc;padding:2px 8px;font-size:14px}"
    "img{max-width:100%;image-rendering:pixelated}figure{margin:1.5em 0}figcaption{color:#555}"
)


def _html(m: dict) -> str:
    d, b = m["dynamics"], m["baseline_copy_last"]
    head = (
        f"Tokenizer {m['tokenizer']['psnr']:.2f} dB PSNR; step-{d['horizon']} rollout "
        f"{d['psnr_by_step'][-1]:.2f} dB against {b['psnr_by_step'][-1]:.2f} dB for copying the last frame; "
        f"delta PSNR at step 4 {d['delta_psnr_t4']:.2f} dB."
    )
    if m.get("play"):
        p = m["play"]
        head += (
            f" Under play's {p['action_kind']} keys: step {d['horizon']} {p['psnr_by_step'][-1]:.2f} dB, "
            f"delta PSNR at step 4 {p['delta_psnr_t4']:.2f} dB, camera error {p['motion_error_px']:.1f} px "
            f"(a dream that never moves: {p['still_motion_error_px']:.1f})."
        )
    figures = [
        ("recon_grid.png", "Tokenizer: test frames (top) and their reconstructions (bottom)."),
        ("codebook_usage.png", "Codebook usage over the test clips."),
        ("single_step.png", "Single-step predictions from real context, with PSNR / SSIM."),
        (
            "multi_step.png",
            "Multi-step rollouts: real, dreamed under the inferred latent actions, under random ones, "
            "and under the actions play sends for the real keys.",
        ),
        (
            "held_latents.png",
            "Each latent action (play's number keys) held from the first clip's context; the "
            "last title is the mean camera shift over 16 clips (px).",
        ),
        ("psnr_by_step.png", "Error accumulation: PSNR and SSIM by step after the context."),
        ("lam_confusion.png", "Which latent action each real action becomes (test levels)."),
        ("rollout.gif", "Real (left) and dreamed (right) rollouts from the same context."),
    ]
    if m["lam"]["nmi_real_actions"] is None:
        figures = [f for f in figures if f[0] != "lam_confusion.png"]
    if not m["dynamics"].get("held_latents"):
        figures = [f for f in figures if f[0] != "held_latents.png"]
    figs = "".join(
        f'<figure><img src="{f}" alt="{html.escape(c)}"><figcaption>{html.escape(c)}</figcaption></figure>'
        for f, c in figures
    )
    sections = "".join(f"<h2>{k}</h2>{_table(v)}" for k, v in m.items() if isinstance(v, dict))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>procgenie evaluation</title>
<style>{STYLE}</style></head>
<body><h1>procgenie evaluation</h1><p>{html.escape(head)}</p>{figs}{sections}
<p>Every figure above, as numbers: <a href="metrics.json">metrics.json</a> (beside this page).</p></body></html>
"""


def print_summary(result: dict, out_dir: Path) -> None:
    """What `eval` prints when it is done: the headline figures of metrics.json."""
    tok, lam, d, play = result["tokenizer"], result["lam"], result["dynamics"], result["play"]
    H = d["horizon"]
    print(
        f"tokenizer PSNR {tok['psnr']:.2f} dB, SSIM {tok['ssim']:.3f}, codes {tok['codebook_used']}/"
        f"{tok['codebook_size']}; LAM PSNR {lam['psnr']:.2f}, actions {lam['actions_used']}/{lam['num_actions']}, "
        f"NMI {_num(lam['nmi_real_actions'], 3)}; dynamics 1-step {d['psnr_1step']:.2f} dB, step {H} "
        f"{d['psnr_by_step'][-1]:.2f} dB (copy-last {result['baseline_copy_last']['psnr_by_step'][-1]:.2f}), "
        f"delta_psnr_t4 {d['delta_psnr_t4']:.2f}"
    )
    if d.get("held_latents"):
        print(
            "each latent held (dream camera dx, dy over the horizon): "
            + "; ".join(f"{h['latent']}: {h['dx_px']:+.1f}, {h['dy_px']:+.1f}" for h in d["held_latents"])
        )
    if play is None:
        print("play: no figures (the dataset holds no actions to press)")
    else:
        print(
            f"play ({play['action_kind']} actions): step {H} {play['psnr_by_step'][-1]:.2f} dB, delta_psnr_t4 "
            f"{play['delta_psnr_t4']:.2f}, moving clips' last step {_num(play['moving_psnr_last_step'])} (copy-last "
            f"{_num(d['moving']['copy_last_last_step'])}), camera error {play['motion_error_px']:.1f} px "
            f"(never moving {play['still_motion_error_px']:.1f})"
        )
    if play is not None and play["held_keys"] is not None:
        print(
            "held keys (camera shift, dream / real, same direction): "
            + "; ".join(
                f"{k} no level played through"
                if not v["levels_compared"]
                else f"{k} {v['dream_shift_px']:+.1f} / {v['real_shift_px']:+.1f} px, "
                + ("level never moved" if v["same_direction"] is None else f"{v['same_direction']:.0%}")
                for k, v in play["held_keys"].items()
            )
        )
    scroll = play and play.get("scroll")
    if scroll:
        moves = [
            f"{k} {_share(v['ratio'])} ({v['levels_same_direction']}/{v['levels_moved']} same way, "
            f"{v['levels_compared']} levels played through)"
            for k, v in scroll.items()
            if k != "long_play" and v is not None
        ]
        long = scroll["long_play"]
        sharp = [] if long is None else [f"long play sharpness {long['ratio']:.0%} of real ({long['frames']} frames)"]
        print("scroll (dream's shift / the level's): " + "; ".join(moves + sharp))
    print(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'report.html'}")


def _share(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _num(x, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"
