"""The miniature world's figures, one per question, from metrics.json's content (reward_forcing/miniworld/report.py).

Every series has its own colour (Okabe-Ito, safe for colour-blind readers) and line style, every axis a label with
its unit, every estimate its 95 % interval (error bars, or bands over seeds for per-frame curves).
"""
import numpy as np

from reward_forcing.miniworld import metrics
from reward_forcing.miniworld.stats import over_seeds

COLOURS = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#D55E00", "#0072B2", "#CC79A7", "#999999")
LINES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
AXIS = {"speed": "speed (px / latent frame)", "validity": "validity (fraction of valid frames)",
        "color_accuracy": "colour accuracy", "first_chunk_similarity": "similarity to the first chunk (cosine)",
        "copies": "near-copies of the first chunk\n(fraction of videos)", "quality": "blob_quality"}
DPI = 150


def style(index: int) -> dict:
    return {"color": COLOURS[index % len(COLOURS)], "linestyle": LINES[index % len(LINES)],
            "marker": MARKERS[index % len(MARKERS)]}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "legend.fontsize": 7,
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _save(fig, run, name: str, files: list) -> None:
    fig.savefig(run.out / name, dpi=DPI, bbox_inches="tight")
    files.append(name)


def _error_bar(ax, x, entry, **kwargs):
    """One estimate (a summary dict) as a point with its 95 % interval."""
    low = entry["mean"] - entry["low"] if entry["low"] is not None else 0
    high = entry["high"] - entry["mean"] if entry["high"] is not None else 0
    ax.errorbar([x], [entry["mean"]], yerr=[[low], [high]], capsize=3, **kwargs)


def _legend_above(fig, axes, ncol):
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=ncol, frameon=False)


# ---- teacher and DMD student against the data (C0, C1) ----

def fidelity_figure(plt, run, content, files):
    rows = content["rows"]
    chain = [name for name in ("data", "teacher", "ode_init") if name in rows]
    chain += [row for row in rows if row.startswith("dmd@")]
    fig, (cdf, fid) = plt.subplots(1, 2, figsize=(7.2, 2.8), gridspec_kw={"width_ratios": [1.4, 1]})
    for index, name in enumerate(chain):
        speeds = np.sort(metrics.pooled(rows[name], "speed"))
        look = style(index)
        cdf.plot(speeds, np.arange(1, len(speeds) + 1) / len(speeds), color=look["color"],
                 linestyle=look["linestyle"], label=name)
        for offset, key in ((-0.12, "color_accuracy"), (0.12, "validity")):
            _error_bar(fid, index + offset, rows[name]["summary"][key], color=look["color"],
                       marker="o" if key == "validity" else "s", linestyle="none")
    cdf.set(xlabel=AXIS["speed"], ylabel="fraction of videos at or below", title="(a) speed distributions")
    cdf.legend(loc="lower right", frameon=False)
    fid.set_xticks(range(len(chain)), chain, rotation=30, ha="right")
    fid.set(ylabel="fraction", title="(b) colour accuracy (squares), validity (dots)")
    fid.set_ylim(min(0.0, fid.get_ylim()[0]), 1.05)
    fig.suptitle("Does the teacher reproduce the data, and the 4-step DMD student the teacher? (C0, C1)", y=1.02)
    _save(fig, run, "fidelity.png", files)
    plt.close(fig)


# ---- Re-DMD against DMD over training length (C2, C2b) ----

def re_dmd_figure(plt, run, content, files):
    rows = content["rows"]
    arms = [name for name in ("dmd", "re_dmd", "re_dmd_bm") if name in run.arms]
    fig, axes = plt.subplots(1, 3, figsize=(8.4, 2.8))
    for index, name in enumerate(arms):
        arm, look = run.arms[name], style(index)
        for panel, key in ((axes[0], "speed"), (axes[1], "validity")):
            entries = [rows[arm.row(n)]["summary"][key] for n in arm.updates]
            shift = (index - 1) * 0.03 * max(arm.updates)
            panel.errorbar([n + shift for n in arm.updates], [e["mean"] for e in entries],
                           yerr=_yerr(entries), capsize=3, label=arm.label, **look)
        if name != "dmd" and "dmd" in run.arms:
            diffs = [metrics.difference(rows, arm.row(n), f"dmd@{n}", "speed").as_dict() for n in arm.updates]
            shift = (index - 1.5) * 0.03 * max(arm.updates)
            axes[2].errorbar([n + shift for n in arm.updates], [d["mean"] for d in diffs], yerr=_yerr(diffs),
                             capsize=3, **look)
    for name, line in (("teacher", ":"), ("data", "--")):
        if name in rows:
            axes[0].axhline(rows[name]["summary"]["speed"]["mean"], color=COLOURS[7], linestyle=line, linewidth=1)
            axes[0].annotate(name, (axes[0].get_xlim()[0], rows[name]["summary"]["speed"]["mean"]),
                             fontsize=7, color=COLOURS[7], va="bottom")
    axes[2].axhline(0, color=COLOURS[7], linewidth=1)
    _update_ticks(axes, run, arms)
    axes[0].set(xlabel="generator updates", ylabel=AXIS["speed"], title="(a) speed")
    axes[1].set(xlabel="generator updates", ylabel=AXIS["validity"], title="(b) validity")
    axes[2].set(xlabel="generator updates", ylabel="speed - DMD's, same seed\n(px / latent frame)",
                title="(c) speed gain over DMD")
    _legend_above(fig, axes, ncol=len(arms))
    fig.tight_layout()
    _save(fig, run, "re_dmd.png", files)
    plt.close(fig)


def _update_ticks(axes, run, arms) -> None:
    """x ticks at the arms' update points only (the points are drawn side by side around them)."""
    points = sorted({n for name in arms for n in run.arms[name].updates})
    for ax in axes:
        ax.set_xticks(points)


def _yerr(entries):
    low = [e["mean"] - e["low"] if e["low"] is not None else 0 for e in entries]
    high = [e["high"] - e["mean"] if e["high"] is not None else 0 for e in entries]
    return [low, high]


# ---- long rollouts (C3) ----

def long_figure(plt, run, content, files):
    long = content["long"]
    panels = ("first_chunk_similarity", "validity", "copies")
    fig, axes = plt.subplots(1, 3, figsize=(9.6, 2.9), sharex=True)
    series = [("data", "world", "the world's own videos")]
    series += [(arm, sink, f"{arm}, sink {sink}") for arm in long if arm != "data" for sink in long[arm]]
    for index, (arm, sink, label) in enumerate(series):
        record, look = long[arm][sink], style(index)
        for ax, key in zip(axes, panels):
            curves = np.asarray(record["curves"][key])
            frames = np.arange(curves.shape[1])
            mean = curves.mean(axis=0)
            ax.plot(frames, mean, color=look["color"], linestyle=look["linestyle"], linewidth=1, label=label)
            if curves.shape[0] > 1:
                bands = [over_seeds(column) for column in curves.T]
                ax.fill_between(frames, [b.low for b in bands], [b.high for b in bands], color=look["color"],
                                alpha=0.15, linewidth=0)
    window = int(_common(run).local_attn_size)
    for ax, key in zip(axes, panels):
        ax.set(xlabel="latent frame", ylabel=AXIS[key])
        ax.axvline(window, color=COLOURS[7], linewidth=0.8, linestyle=":")
        ax.annotate(f" window full ({window} frames)", (window, 1), xycoords=("data", "axes fraction"), fontsize=6,
                    color=COLOURS[7], va="top")
    axes[0].set_title("(a) copying of the first chunk")
    axes[1].set_title("(b) valid frames")
    axes[2].set_title("(c) near-copies (periodic snap-back)")
    _legend_above(fig, axes, ncol=min(len(series), 4))
    fig.tight_layout()
    _save(fig, run, "long_rollouts.png", files)
    plt.close(fig)


def _common(run):
    from omegaconf import OmegaConf

    from reward_forcing.miniworld.experiment import CONFIGS

    return OmegaConf.load(CONFIGS / "common.yaml")


# ---- two-arm comparisons (C4, C5) ----

def comparison_figure(plt, run, content, files, name, title, rows_shown):
    rows = content["rows"]
    shown = [row for row in rows_shown if row in rows]
    if len(shown) < 2:
        return
    fig, axes = plt.subplots(1, 2, figsize=(6.0, 2.6))
    for ax, key in zip(axes, ("speed", "validity")):
        for index, row in enumerate(shown):
            look = style(index)
            _error_bar(ax, index, rows[row]["summary"][key], color=look["color"], marker=look["marker"],
                       linestyle="none")
        ax.set_xticks(range(len(shown)), shown, rotation=20, ha="right")
        ax.set(ylabel=AXIS[key])
    fig.suptitle(title, y=1.02)
    fig.tight_layout()
    _save(fig, run, name, files)
    plt.close(fig)


# ---- Causal Forcing (C6) ----

INITS = (("ode_init", "speed_w1_teacher", "ODE init\n(to the\nbidirectional\nteacher)"),
         ("cf_ode_init", "speed_w1_ar_teacher", "causal\nODE init\n(to the AR\nteacher)"))
CAUSAL_ARMS = ("dmd", "cf_dmd", "cf_re_dmd_b4")


def causal_forcing_figure(plt, run, content, files):
    rows = content["rows"]
    inits = [(row, key, label) for row, key, label in INITS if row in rows and key in rows[row]["summary"]]
    arms = [name for name in CAUSAL_ARMS if name in run.arms]
    if not inits and len(arms) < 2:
        return
    fig, (init_ax, speed_ax) = plt.subplots(1, 2, figsize=(7.6, 2.8), gridspec_kw={"width_ratios": [1, 1.4]})
    for index, (row, key, label) in enumerate(inits):
        look = style(index)
        _error_bar(init_ax, index, rows[row]["summary"][key], color=look["color"], marker=look["marker"],
                   linestyle="none")
    init_ax.set_xticks(range(len(inits)), [label for _, _, label in inits])
    init_ax.set_xlim(-0.6, len(inits) - 0.4)
    init_ax.set(ylabel="speed W1 to its own teacher\n(px / latent frame)", title="(a) does the init keep motion?")
    for index, name in enumerate(arms):
        arm, look = run.arms[name], style(index)
        entries = [rows[arm.row(n)]["summary"]["speed"] for n in arm.updates]
        x = [n + (index - 1) * 0.03 * max(arm.updates) for n in arm.updates]  # side by side at a shared point
        speed_ax.errorbar(x, [e["mean"] for e in entries], yerr=_yerr(entries), capsize=3, label=arm.label, **look)
        if all(e["low"] is not None for e in entries):
            speed_ax.fill_between(x, [e["low"] for e in entries], [e["high"] for e in entries],
                                  color=look["color"], alpha=0.15, linewidth=0)
    _update_ticks([speed_ax], run, arms)
    speed_ax.set(xlabel="generator updates", ylabel=AXIS["speed"], title="(b) speed of DMD from each init")
    speed_ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), frameon=False)
    fig.suptitle("Does the causal ODE init keep its teacher's motion, and does DMD from it move faster? (C6)", y=1.02)
    fig.tight_layout()
    _save(fig, run, "causal_forcing.png", files)
    plt.close(fig)


def _final_rows(run, *arms):
    return [run.arms[a].row(run.arms[a].updates[-1]) for a in arms if a in run.arms]


# ---- strips ----

def detector_image(world, latent):
    """[C, F, H, W] -> an RGB strip [H, F*(W+1), 3]: each frame's detected colour, brightness its response."""
    import matplotlib.colors as mcolors
    import torch

    from reward_forcing.miniworld.detector import colour_maps

    maps = colour_maps(world, latent[None])[0].clamp(min=0) / world.spec.blob_amplitude  # [K, F, H, W]
    rgb = torch.tensor([mcolors.to_rgb(name) for name in world.spec.colours])       # [K, 3]
    image = torch.einsum("kfhw,kc->fhwc", maps, rgb).clamp(0, 1)
    gap = torch.ones(image.shape[0], image.shape[1], 1, 3)
    return torch.cat([torch.cat([frame, g], dim=1) for frame, g in zip(image, gap)], dim=1).numpy()


def strip_axis(ax, world, path, name: str, frames: int, numbered: bool) -> None:
    """One saved sample (save_strip's file at path) as a row of detector images, labelled with its name and prompt;
    frame numbers under it when `numbered`."""
    import torch

    sample = torch.load(path, weights_only=True)
    image = detector_image(world, sample["latent"][:, :frames])
    width = image.shape[1] / frames
    ax.imshow(image, interpolation="nearest")
    ax.set_yticks([])
    ax.set_ylabel(f"{name}\n\"{sample['prompt']}\"", rotation=0, ha="right", va="center", fontsize=7)
    ax.set_xticks([width * (f + 0.5) for f in range(frames)], [str(f) if numbered else "" for f in range(frames)])
    for spine in ax.spines.values():
        spine.set_visible(False)


def strips_figure(plt, run, content, files):
    world = run.world()
    names = [name for name in content["rows"] if (run.out / "samples" / f"{name}.pt").is_file()]
    frames = int(run.settings.strip_frames)
    fig, axes = plt.subplots(len(names), 1, figsize=(0.55 * frames + 1.6, 0.62 * len(names) + 0.4), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        strip_axis(ax, world, run.out / "samples" / f"{name}.pt", name, frames, ax is axes[-1, 0])
    axes[-1, 0].set_xlabel("latent frame")
    fig.suptitle("Samples read by the detector (hue: detected colour, brightness: response)", y=1.0)
    fig.tight_layout(h_pad=0.2)
    _save(fig, run, "strips.png", files)
    plt.close(fig)


# ---- image-to-video (C7) ----

def image_to_video_figure(plt, run, content, files):
    """(a) position jump per image-to-video row with its interval and the position_kept threshold; (b) the world's
    own video from the given frame and each arm's continuation of it."""
    from reward_forcing.miniworld.evaluation import JUMP_SPEEDS
    from reward_forcing.miniworld.stages import IMAGE_ROW

    rows = [name for name in content["rows"] if name.startswith(IMAGE_ROW)]
    if not rows:
        return
    world, folder = run.world(), run.out / "samples" / "image"
    strips = [("world", folder / "world.pt")] + [(name, folder / f"{name}.pt") for name in rows]
    frames = int(run.settings.strip_frames)
    fig = plt.figure(figsize=(0.55 * frames + 4.4, 0.7 * len(strips) + 0.9))
    grid = fig.add_gridspec(len(strips), 2, width_ratios=[1.1, 0.22 * frames])
    jump = fig.add_subplot(grid[:, 0])
    for index, name in enumerate(rows):
        look = style(index)
        _error_bar(jump, index, content["rows"][name]["summary"]["position_jump"], color=look["color"],
                   marker=look["marker"], linestyle="none")
    threshold = JUMP_SPEEDS * world.spec.max_speed
    jump.axhline(threshold, color=COLOURS[7], linestyle="--", linewidth=1)
    jump.annotate(f"kept: <= {JUMP_SPEEDS:g} x max_speed", (0, threshold), xycoords=("axes fraction", "data"),
                  fontsize=6, color=COLOURS[7], va="bottom")
    jump.set_xticks(range(len(rows)), [name[len(IMAGE_ROW):] for name in rows], rotation=20, ha="right")
    jump.set_xlim(-0.5, len(rows) - 0.5)
    jump.set(ylabel="position jump, given frame to frame 1 (px)", title="(a) position jump")
    for row, (name, path) in enumerate(strips):
        ax = fig.add_subplot(grid[row, 1])
        strip_axis(ax, world, path, name.removeprefix(IMAGE_ROW), frames, row == len(strips) - 1)
        if row == 0:
            ax.set_title("(b) the given frame (0) and what follows")
    ax.set_xlabel("latent frame (0: the given frame)")
    fig.suptitle("Does the student trained from a clean first frame continue a given frame? (C7)", y=1.0)
    fig.tight_layout(h_pad=0.2)
    _save(fig, run, "image_to_video.png", files)
    plt.close(fig)


def write_figures(run, content) -> list[str]:
    plt, files = _pyplot(), []
    fidelity_figure(plt, run, content, files)
    re_dmd_figure(plt, run, content, files)
    if content["long"]:
        long_figure(plt, run, content, files)
    comparisons = (
        ("reward_feedback.png", "Does reward feedback on the last frame keep motion better than on a random one? (C4)",
         ["ode_init", *_final_rows(run, "rf_last", "rf_random")]),
        ("cache_grad.png", "Straight-through against detached rollout gradient (C5)",
         [f"dmd@{n}" for n in run.arms["dmd_detached"].updates] + _final_rows(run, "dmd_detached")
         if "dmd_detached" in run.arms else []),
    )
    for name, title, shown in comparisons:
        comparison_figure(plt, run, content, files, name, title, shown)
    causal_forcing_figure(plt, run, content, files)
    image_to_video_figure(plt, run, content, files)
    strips_figure(plt, run, content, files)
    return files
