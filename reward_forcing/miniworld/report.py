"""The miniature world's report stage: metrics.json (every row's per-video values, its summaries and the long
rollouts), the claims computed from it (reward_forcing/miniworld/claims.py), report.md and the figures."""
import json

from omegaconf import OmegaConf

from reward_forcing.miniworld import metrics
from reward_forcing.miniworld.claims import evaluate_claims
from reward_forcing.miniworld.evaluation import COPY_SIMILARITY, JUMP_SPEEDS
from reward_forcing.miniworld.stages import IMAGE_ROW
from reward_forcing.miniworld.stats import over_seeds

TABLE_METRICS = ("color_accuracy", "validity", "speed", "speed_w1_data", "speed_w1_teacher", "speed_w1_ar_teacher")
EXTRA_METRICS = ("path_speed", "straightness", "reward", "quality")
IMAGE_METRICS = ("position_jump", "position_kept", "color_accuracy", "validity", "speed")
LONG_CURVES = ("validity", "color_drift", "first_chunk_similarity", "copies")
QUICK_BANNER = ("> **`--quick` run: a pipeline check at toy sizes, not a result.** Every model is trained for a few "
                "steps on a tiny network, so the numbers below (a teacher with validity near 0, claims inconclusive "
                "on one seed) say nothing about the methods; `python scripts/miniworld.py --output_dir DIR` without "
                "`--quick` measures them.")


def tail(curve: list) -> list:
    """The last third of a per-frame curve (at least one frame)."""
    return curve[-max(1, len(curve) // 3):]


def long_summary(long: dict) -> dict:
    """Adds to each (arm, sink) record `tail`: per seed, the mean of each curve over the last third of the frames."""
    out = {}
    for arm, sinks in long.items():
        out[arm] = {}
        for sink, record in sinks.items():
            means = {key: [sum(tail(c)) / len(tail(c)) for c in curves] for key, curves in record["curves"].items()}
            out[arm][sink] = dict(record, tail=means)
    return out


def row_info(run, name: str) -> dict:
    """The arm a row belongs to, its generator updates and its label."""
    if name.startswith(IMAGE_ROW):
        info = row_info(run, name[len(IMAGE_ROW):])
        return info | {"label": f"image-to-video: {info['label']}"}
    arm_name, _, updates = name.partition("@")
    if arm_name in run.arms:
        arm = run.arms[arm_name]
        return {"arm": arm_name, "updates": int(updates), "label": f"{arm.label}, {updates} updates"}
    labels = {"data": "the world's data (held out)", "teacher": "teacher (bidirectional, 24-step Euler)",
              "ode_init": "ODE init (causal student, 4 steps)",
              "ar_teacher": "autoregressive teacher (causal, teacher forcing)", "cf_ode_init": "causal ODE init"}
    return {"arm": name, "updates": None, "label": labels.get(name, name)}


def collect(run) -> dict:
    """metrics.json's content from the stage records."""
    rows = {**run.record("data")["results"], **run.record("ode_pairs")["results"],
            **run.record("cf_pairs")["results"], **run.record("evaluate")["results"],
            **(run.record("image")["results"] if run.done("image") else {})}
    out_rows = {}
    for name, row in rows.items():
        summary = {m.name: metrics.estimate(rows, name, m.name).as_dict() for m in metrics.METRICS
                   if m.reference != name and m.video_key in row["videos"][0]}  # not a row's W1 to itself
        out_rows[name] = {**row_info(run, name), **row, "summary": summary}
    long = long_summary(run.record("long")["results"]) if run.done("long") else {}
    stage_seconds = {stage: run.record(stage)["seconds"] for stage in
                     ("data", "teacher", "ode_pairs", "ode_init", "ar_teacher", "cf_pairs", "cf_ode_init", "arms",
                      "evaluate", "image", "long") if run.done(stage)}
    return {"quick": run.quick, "reward": run.reward, "settings": OmegaConf.to_container(run.settings),
            "rows": out_rows, "long": long, "stages": stage_seconds}


def claims_of(metrics_json: dict) -> list:
    """The claims of a metrics.json's content (a loaded file or collect()'s output)."""
    return evaluate_claims(metrics_json["rows"], metrics_json["long"], list(metrics_json["settings"]["claim_updates"]))


# ---- report.md -----------------------------------------------------------------------------------

def _interval(entry: dict, digits: int = 3) -> str:
    if entry["low"] is None:
        return f"{entry['mean']:.{digits}f}"
    return f"{entry['mean']:.{digits}f} [{entry['low']:.{digits}f}, {entry['high']:.{digits}f}]"


def claims_table(claims) -> list[str]:
    lines = ["| claim | statement | checks: estimate [95 % interval] vs condition | verdict |", "|---|---|---|---|"]
    for claim in claims:
        if claim.missing:
            checks = "rows not run: " + ", ".join(claim.missing)
        else:
            checks = "<br>".join(f"{c.label} = {_interval(c.estimate.as_dict())} {c.condition}: {c.verdict}"
                                 for c in claim.checks)
        lines.append(f"| {claim.key} | {claim.statement} | {checks} | **{claim.verdict}** |")
    return lines


def rows_table(rows: dict, names: tuple) -> list[str]:
    lines = ["| row | seeds | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for name, row in rows.items():
        cells = [_interval(row["summary"][m]) if m in row["summary"] else "—" for m in names]
        lines.append(f"| {name} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    return lines


def long_table(long: dict) -> list[str]:
    lines = ["| arm | sink | seeds | " + " | ".join(LONG_CURVES) + " |", "|---" * (len(LONG_CURVES) + 3) + "|"]
    for arm, sinks in long.items():
        for sink, record in sinks.items():
            cells = [_interval(over_seeds(record["tail"][key]).as_dict()) for key in LONG_CURVES]
            lines.append(f"| {arm} | {sink} | {len(record['seeds'])} | " + " | ".join(cells) + " |")
    return lines


def periodic_copies(long: dict, threshold: float = 0.5) -> list[str]:
    """Frames after the first window where at least `threshold` of a student's videos (mean over seeds) are
    near-copies of the first chunk: the periodic snap back to the first frames that real streaming models show."""
    lines = []
    for arm, sinks in long.items():
        if arm == "data":
            continue
        for sink, record in sinks.items():
            copies = [sum(values) / len(values) for values in zip(*record["curves"]["copies"])]
            frames = [f for f, value in enumerate(copies) if f >= 6 and value >= threshold]
            where = ", ".join(map(str, frames[:20])) + (" ..." if len(frames) > 20 else "") if frames else "none"
            lines.append(f"| {arm} | {sink} | {max(copies[6:], default=0):.2f} | {where} |")
    return ["| arm | sink | most copies in one frame (after frame 6) | frames with >= "
            f"{threshold:.0%} copies |", "|---|---|---|---|", *lines]


def settings_lines(run, data: dict) -> list[str]:
    s = run.settings
    w, dit = s.world, s.dit
    arms = "; ".join(f"`{a.name}` ({a.label}): {a.stage}, `{' '.join(a.overrides)}`, updates {list(a.updates)}, "
                     f"seeds {list(a.seeds)}" for a in run.arms.values())
    return [
        f"- World: {w.height} x {w.width} latent pixels x {w.channels} channels, {w.frames} latent frames, "
        f"{len(w.colours)} colours, blob sigma {w.blob_sigma} px, speed uniform in [0, {w.max_speed}] px / latent "
        f"frame; {s.data_samples} training videos.",
        f"- DiT (student and critic{'' if run.separate_base else ', teacher'}): dim {dit.dim}, {dit.num_layers} "
        f"layers, {dit.num_heads} heads, patch {list(dit.patch_size)}"
        + (f"; the teacher: {OmegaConf.to_container(s.teacher_dit)} over it, and the student and critic start from "
           "a base model of their own size trained on the data" if run.separate_base else
           "; the student and critic start from the teacher's weights") + ".",
        f"- Stage overrides: `{OmegaConf.to_container(s.stage_overrides)}`.",
        f"- Causal Forcing (arXiv 2602.02214): the autoregressive teacher is the student's architecture fine-tuned "
        f"from its base weights for {s.causal_forcing.ar_teacher_steps} steps with teacher forcing (teacher.yaml, "
        "causal: true); its chunk-by-chunk ODE pairs (the ar_teacher row) train the causal ODE init from its "
        "weights, the init of the cf_ arms (whose real score is still the bidirectional teacher).",
        f"- Arms (seeds {list(s.seeds)}; Re-DMD reward `{run.reward}`): {arms}.",
        f"- Evaluation: {s.eval_per_colour} videos per colour per row and seed; the data row holds "
        f"{s.data_reference_per_colour} per colour, the teacher row its {s.pairs_per_colour} ODE pairs per colour. "
        f"Long rollouts: {s.long.frames} latent frames, {s.long.per_colour} videos per colour, arms "
        f"{list(s.long.arms)}, sinks {list(s.long.sinks)}.",
        "- Intervals (95 %): rows with several seeds, Student's t over seeds (each seed one number: the mean over its "
        "videos, or its W1); differences paired by seed (the same seed draws the same prompts and noise in training "
        "and evaluation); against a model trained once (the teacher), each seed minus its value. One-seed rows (data, "
        "teachers, ODE inits): a basic bootstrap over their videos (2000 resamples; for W1 it removes the upward bias "
        "of finite samples); a difference of two of them (C6a), the same bootstrap resampling both rows' videos "
        "independently. A difference on one seed has no interval.",
    ]


def metric_lines() -> list[str]:
    lines = ["| metric | what it measures | range / units |", "|---|---|---|"]
    lines += [f"| {m.name} | {m.meaning} | {m.scale} |" for m in metrics.METRICS]
    lines += ["| first_chunk_similarity | long rollouts: cosine of a frame's foreground (latent minus the world's "
              "background) to the first chunk's mean foreground | -1 to 1; the world's own videos about 0.4 |",
              f"| copies | long rollouts: fraction of videos whose frame is a near-copy of the first chunk "
              f"(similarity >= {COPY_SIMILARITY}) | 0 to 1 |",
              "| color_drift | long rollouts: fraction of videos whose frame shows another colour than the prompt's | "
              "0 to 1 |"]
    return lines


def image_lines(run) -> list[str]:
    image, world = run.settings.image, run.settings.world
    return [f"## Image-to-video (frame {image.frame} of {image.per_colour} held-out world videos per colour given, "
            "mean [95 % interval over seeds])", "",
            f"Each `image.arms` student ({', '.join(image.arms)}) at the last update point they share continues the "
            "given frame under its video's prompt (chunk 0 keeps it as frame 0, "
            "reward_forcing/inference/generator.py). position_jump: how far the blob moves from the given frame to "
            f"generated frame 1; position_kept: at most {JUMP_SPEEDS:g} x max_speed = "
            f"{JUMP_SPEEDS * world.max_speed:g} px. Colour accuracy, validity and speed are of frames 1 on."]


def write_report(run, content: dict, claims, figures: list[str]) -> None:
    rows, long = content["rows"], content["long"]
    text_rows = {name: row for name, row in rows.items() if not name.startswith(IMAGE_ROW)}
    lines = ["# Miniature world: Reward Forcing measured end to end", ""]
    if content["quick"]:
        lines += [QUICK_BANNER, ""]
    lines += ["## Settings", "", *settings_lines(run, content), "",
              "## Claims", "", *claims_table(claims), "",
              "## Rows (mean [95 % interval])", "", *rows_table(text_rows, TABLE_METRICS), "",
              *rows_table(text_rows, EXTRA_METRICS), ""]
    if long:
        lines += [f"## Long rollouts ({run.settings.long.frames} latent frames; mean over the last third of the "
                  "frames, [95 % interval over seeds])", "", *long_table(long), "", *periodic_copies(long), ""]
    images = {name: row for name, row in rows.items() if name.startswith(IMAGE_ROW)}
    if images:
        lines += [*image_lines(run), "", *rows_table(images, IMAGE_METRICS), ""]
    lines += ["## Metrics", "", *metric_lines(), "",
              "## Wall time per stage", "", "| stage | seconds |", "|---|---|",
              *[f"| {stage} | {seconds:.1f} |" for stage, seconds in content["stages"].items()],
              f"| total | {sum(content['stages'].values()):.1f} |", "",
              "## Figures", "", *[f"![{name}]({name})" for name in figures], ""]
    (run.out / "report.md").write_text("\n".join(lines))


def stage_report(run) -> dict:
    from reward_forcing.miniworld.figures import write_figures

    content = collect(run)
    path = run.out / "metrics.json"
    path.write_text(json.dumps(content))
    content = json.loads(path.read_text())  # the claims are computed from the file as written
    claims = claims_of(content)
    (run.out / "claims.json").write_text(json.dumps([claim.as_dict() for claim in claims], indent=1))
    figures = write_figures(run, content)
    write_report(run, content, claims, figures)
    return {"figures": figures, "claims": {claim.key: claim.verdict for claim in claims}}
