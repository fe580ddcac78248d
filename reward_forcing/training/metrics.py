"""What a training run records, rank 0 only: per-optimiser-step metrics in `<logdir>/metrics.jsonl` and
wandb (online / offline / disabled), the merged `<logdir>/config.yaml`, and one-line notices (resume, done)."""
import json
import math
import secrets
import time
from pathlib import Path

SAVED_CONFIG = "config.yaml"


def notice(message: str) -> None:
    """A one-line message that does not break a tqdm progress bar."""
    from tqdm import tqdm

    tqdm.write(message)



class MetricsLogger:
    def __init__(self, logdir, is_main: bool, wandb_mode: str = "disabled", config=None,
                 project: str = "reward-forcing", run_name=None, resume_step=None):
        """resume_step: the step of the checkpoint the run resumes from; rows after it (written by the
        interrupted run past its last checkpoint) are dropped so the file reads as one uninterrupted run.
        `config` (the merged run config) is saved as `<logdir>/config.yaml`; a resumed run says so."""
        self.is_main = is_main
        self.path = Path(logdir) / "metrics.jsonl"
        self.wandb = None
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate(resume_step)
        if config is not None:
            from reward_forcing.config import save_config

            save_config(config, self.path.with_name(SAVED_CONFIG))
        if resume_step is not None:
            notice(f"resumed from step {resume_step} ({Path(logdir)})")
        if wandb_mode != "disabled":
            self.wandb = _init_wandb(Path(logdir), wandb_mode, config, project, run_name)

    def _truncate(self, resume_step) -> None:
        if not self.path.exists():
            return
        keep = []
        if resume_step is not None:
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a crash
                    continue
                if row.get("step", math.inf) <= resume_step:
                    keep.append(line)
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, step: int, row: dict) -> None:
        """Append `row` for optimiser step `step`, with `wall_time` (Unix seconds when it was logged)."""
        if not self.is_main:
            return
        clean = {"step": int(step), "wall_time": round(time.time(), 3)}
        for key, value in row.items():
            clean[key] = float(value) if not isinstance(value, (str, bool, int)) else value
        with self.path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")
        if self.wandb is not None:
            self.wandb.log(clean, step=int(step))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _init_wandb(logdir: Path, mode: str, config, project: str, run_name):
    import wandb
    from omegaconf import OmegaConf

    id_file = logdir / "wandb_id.txt"  # the same run id on resume, so curves continue
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    id_file.write_text(run_id)
    config_dict = OmegaConf.to_container(config, resolve=True) if config is not None else None
    return wandb.init(project=project, name=run_name, id=run_id, resume="allow", mode=mode,
                      dir=str(logdir), config=config_dict)


def learning_rates(**optimizers) -> dict:
    """{'lr_<name>': current learning rate} of each optimiser's first parameter group."""
    return {f"lr_{name}": optimizer.param_groups[0]["lr"] for name, optimizer in optimizers.items()}


def reduce_across_ranks(row: dict, device) -> dict:
    """Global values of a metrics row: `*_min` / `*_max` keys by min / max, the others averaged over ranks.
    Every rank must pass the same keys (one collective per reduction kind)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(row)
    out = {}
    for suffix, op in (("_min", dist.ReduceOp.MIN), ("_max", dist.ReduceOp.MAX), (None, dist.ReduceOp.SUM)):
        keys = sorted(k for k in row if (k.endswith(suffix) if suffix else not k.endswith(("_min", "_max"))))
        if not keys:
            continue
        values = torch.tensor([float(row[k]) for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(values, op=op)
        if suffix is None:
            values /= dist.get_world_size()
        out.update(zip(keys, values.tolist()))
    return out
