"""``moeforge train CONFIG.yaml [--key value ...]``: run (or resume) a training job.

Also ``torchrun --nproc-per-node N -m moeforge train CONFIG.yaml`` for data-parallel training.
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    from ..train.config import config_help

    @app.command(
        "train",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        epilog="Config keys (override any with --key value; data sources by index or name, e.g. "
        "--data.prose.weight 0.5):\n\n" + config_help().replace("\n", "\n\n"),
    )
    def train_cmd(
        ctx: typer.Context,
        config: Path = typer.Argument(..., metavar="CONFIG", help="YAML training config (see configs/)."),
    ) -> None:
        """Train (CPT, SFT, PEFT-MoE or composition) as CONFIG says; rerunning resumes from output_dir."""
        from ..train import train
        from ..train.config import load_config

        cfg = load_config(config, list(ctx.args))
        result = train(cfg)
        if result.final_dir is not None or result.steps:
            import os

            if int(os.environ.get("RANK", "0")) == 0:
                loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
                if result.resumed_from is not None and result.resumed_from >= result.steps:
                    print(f"{cfg.output_dir} already holds this run finished at step {result.steps}; nothing to train "
                          f"(raise --steps to train further). Final loss {loss}")
                else:
                    since = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
                    print(f"trained {result.steps} steps ({result.tokens:,} tokens{since}) in {result.wall_time_s:.0f}s; "
                          f"final loss {loss}")
                if result.eval_losses:
                    print("validation loss: " + ", ".join(f"{k} {v:.4f}" for k, v in result.eval_losses.items()))
                tasks = [r for r in result.history if r.get("kind") == "tasks" and r.get("final")]
                if tasks:
                    print("task accuracy: " + ", ".join(f"{k} {v['accuracy']:.1%} ({v['correct']}/{v['total']})"
                                                        for k, v in tasks[-1]["tasks"].items()))
                print(f"metrics: {result.metrics_path}")
                if result.final_dir is not None:
                    print(f"model: {result.final_dir}")
