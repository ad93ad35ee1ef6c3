"""The `specmesh` console script: `specmesh --help` lists every command.

Each group lives in its own module and imports heavy libraries (torch, transformers) only
inside its commands, so `specmesh status` stays fast.
"""

from __future__ import annotations

import typer

from shared.cli import batch_cmd, chat_cmd, trace_cmd
from shared.cli import adaptive_bench, config_cmd, engine_cmd, models_cmd, router_cmd, serve_bench, stack_cmd
from shared.cli import load_bench, prefix_bench, runner_bench, soak_bench

app = typer.Typer(
    name="specmesh",
    help="SpecMesh: multi-level speculative decoding as NATS microservices.",
    no_args_is_help=True,
    add_completion=False,
)

stack_cmd.register(app)
trace_cmd.register(app)
batch_cmd.register(app)
chat_cmd.register(app)
config_cmd.register(app)
serve_bench.register(engine_cmd.bench_app)
adaptive_bench.register(engine_cmd.bench_app)
load_bench.register(engine_cmd.bench_app)
soak_bench.register(engine_cmd.bench_app)
prefix_bench.register(engine_cmd.bench_app)
runner_bench.register(engine_cmd.bench_app)
router_cmd.register(app)
engine_cmd.register(app)
app.add_typer(models_cmd.app, name="models", help="Train, list and evaluate the model family.")


if __name__ == "__main__":
    app()
