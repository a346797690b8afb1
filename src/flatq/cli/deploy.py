"""The table of `flatq.runs.deploy.deploy_runs`: the end of `flatq demo`."""

from __future__ import annotations

from ..runs.deploy import Deployed


def print_deployment(rows: list[Deployed]) -> None:
    """The table: accuracy, latency and size, each quantized row also as a ratio to the first."""
    base = rows[0]
    print(f"{'ONNX model':<22}{'accuracy':>10}{'ms/batch':>10}{'speed-up':>10}{'bytes':>12}"
          f"{'smaller':>9}")
    for row in rows:
        print(f"{row.name:<22}{row.accuracy:>9.2f}%{row.latency_ms:>10.1f}"
              f"{base.latency_ms / row.latency_ms:>9.2f}x{row.file_bytes:>12,}"
              f"{base.file_bytes / row.file_bytes:>8.1f}x")
    print("files: " + ", ".join(str(row.path) for row in rows))
