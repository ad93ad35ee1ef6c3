"""`specmesh run-batch`: a JSONL file of API requests through the gateway (vLLM's `run-batch`).

    specmesh run-batch -i requests.jsonl -o results.jsonl --concurrency 8

The format, resuming and retries are in shared/batch.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("run-batch")
    def run_batch_cmd(
        input_file: Path = typer.Option(..., "--input", "-i", help="JSONL: one {custom_id, method, url, body} a line."),
        output_file: Path = typer.Option(..., "--output", "-o", help="JSONL: one result a line, appended as each ends."),
        url: Optional[str] = typer.Option(None, help="Gateway URL (default: settings.gateway.http_url)."),
        concurrency: int = typer.Option(8, min=1, max=1024, help="Requests in flight at once."),
        retries: int = typer.Option(4, min=0, max=100, help="More attempts for a request answered 408/429/5xx or not at all."),
        timeout: float = typer.Option(600.0, min=1.0, help="Seconds one attempt may take."),
        ca_certs: Optional[Path] = typer.Option(None, "--ca-certs", exists=True, dir_okay=False,
                                                help="PEM file vouching for an https gateway's certificate."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Start the output file afresh instead of resuming it."),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
    ) -> None:
        """Run every request of a batch file through the gateway; run again with the same output file to resume."""
        from tqdm import tqdm

        from shared.batch import BadBatch, plan_batch, read_batch, run_batch
        from shared.cli.client import api_key_header
        from shared.settings import get_settings

        try:
            lines = input_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            typer.echo(f"error: cannot read {input_file}: {exc}", err=True)
            raise typer.Exit(2)
        try:
            requests = read_batch(lines)
        except BadBatch as exc:
            typer.echo(f"error: {input_file}: {exc}", err=True)
            raise typer.Exit(2)
        if not requests:
            typer.echo(f"error: {input_file} holds no requests", err=True)
            raise typer.Exit(2)
        if output_file.exists() and output_file.resolve() == input_file.resolve():
            typer.echo("error: the output file is the input file; give another", err=True)
            raise typer.Exit(2)
        try:
            output_file.parent.mkdir(parents=True, exist_ok=True)
            plan = plan_batch(requests, output_file, resume=not overwrite)
        except (OSError, ValueError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)
        bar = tqdm(total=len(plan.requests), desc="batch", unit="req", disable=as_json)
        summary = asyncio.run(run_batch(plan, output_file, url=url or get_settings().gateway.http_url,
                                        headers=api_key_header(), concurrency=concurrency, retries=retries,
                                        timeout_s=timeout, progress=bar.update, ca_certs=ca_certs))
        bar.close()
        result = summary.as_dict() | {"output": str(output_file)}
        if as_json:
            typer.echo(json.dumps(result, indent=2))
        else:
            outcomes = ", ".join(f"{key}: {n}" for key, n in result["outcomes"].items()) or "none"
            typer.echo(f"{summary.sent} sent, {summary.skipped} already done; results by status: {outcomes}")
            typer.echo(f"{summary.completion_tokens} tokens generated in {summary.elapsed_s:.1f} s"
                       + (f" ({result['completion_tokens_per_s']:.1f} tok/s)" if result["completion_tokens_per_s"] else "")
                       + f"; results in {output_file}")
        if summary.failed:
            typer.echo(f"{summary.failed} request(s) did not succeed (their results say why); running again with the "
                       f"same output file sends those answered 408, 429 or 5xx, or not at all", err=True)
            raise typer.Exit(1)
