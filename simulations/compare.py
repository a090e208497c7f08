"""Side by side: two (or more) runs of the ServerApp, e.g. FedAvg and CCAMerge on the same seed and split.

Reads each run's ``history.json`` (written by ``server/server_app.py`` under ``out-dir``) and
writes one PNG with every accuracy curve and a markdown table: test accuracy per round, what
the aligned merge chose each round, merge time and bytes received per client. ``bash
scripts/quickstart.sh --compare`` runs FedAvg and CCAMerge and then this::

    python -m simulations.compare outputs/fedavg-seed0 outputs/cca-seed0 --out outputs/compare
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from simulations.harness import Series, line_plot, markdown_table

HISTORY = "history.json"


def load_history(folder: Path) -> dict[str, Any]:
    """The ``history.json`` of a run folder; a clear error when the run left none."""
    path = folder / HISTORY
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: did the run in {folder} finish a round?")
    return json.loads(path.read_text())


def label_of(history: dict[str, Any]) -> str:
    """A run's name in the plot and table: its strategy."""
    return str(history["run_config"].get("strategy", "run"))


def comparison_table(histories: Sequence[dict[str, Any]]) -> str:
    """Markdown: per round, each run's test accuracy and, for CCAMerge, the merge it chose and its time."""
    labels = [label_of(h) for h in histories]
    rounds = max(len(h["rounds"]) for h in histories)
    headers = ["round", *(f"{label} acc %" for label in labels)]
    merging = [i for i, h in enumerate(histories) if any(r.get("merge_choice") for r in h["rounds"])]
    for i in merging:
        headers += [f"{labels[i]} merge chosen", f"{labels[i]} merge s"]
    rows = [["0", *(f"{100 * h['initial']['accuracy']:.1f}" for h in histories), *([""] * 2 * len(merging))]]
    for index in range(rounds):
        row = [str(index + 1)]
        row += [f"{100 * h['rounds'][index]['accuracy']:.1f}" if index < len(h["rounds"]) else "-" for h in histories]
        for i in merging:
            entry = histories[i]["rounds"][index] if index < len(histories[i]["rounds"]) else {}
            row += [entry.get("merge_choice") or "-", f"{entry.get('merge_seconds', 0.0):.2f}"]
        rows.append(row)
    return markdown_table(headers, rows)


def cost_table(histories: Sequence[dict[str, Any]]) -> str:
    """Markdown: final and best accuracy, mean merge time, bytes received per client and round, wall time."""
    rows = []
    for history in histories:
        rounds = history["rounds"]
        received = [np.mean([int(b) for b in r["bytes_received"].values()]) for r in rounds if r["bytes_received"]]
        statistics = [np.mean([int(b) for b in r["statistics_bytes"].values()]) if r["statistics_bytes"] else 0.0
                      for r in rounds]
        rows.append([label_of(history), f"{100 * rounds[-1]['accuracy']:.1f}",
                     f"{100 * max(r['accuracy'] for r in rounds):.1f}",
                     f"{np.mean([r['merge_seconds'] for r in rounds]):.2f}",
                     f"{np.mean(received) / 1024:.0f}", f"{np.mean(statistics) / 1024:.0f}",
                     f"{sum(r['train_seconds_wall'] + r['aggregate_seconds'] for r in rounds):.0f}"])
    return markdown_table(["strategy", "final acc %", "best acc %", "merge s / round", "KiB received / client",
                           "of which statistics KiB", "train + merge s"], rows)


def compare(folders: Sequence[Path], out: Path) -> str:
    """Write ``out/compare.png`` and ``out/compare.md`` for the runs in ``folders``; return the markdown."""
    histories = [load_history(folder) for folder in folders]
    series = [Series(label_of(h), range(len(h["rounds"]) + 1),
                     [100 * h["initial"]["accuracy"], *(100 * r["accuracy"] for r in h["rounds"])]) for h in histories]
    config = histories[0]["run_config"]
    title = (f"{config.get('model')} on {config.get('dataset')}, {config.get('partitioning')} "
             f"(alpha {config.get('alpha')}), seed {config.get('seed')}")
    line_plot(out / "compare.png", series, title=title, xlabel="round", ylabel="test accuracy (%)")
    text = (f"## {title}\n\n" + comparison_table(histories) + "\n\n" + cost_table(histories) + "\n")
    (out / "compare.md").write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> str:
    """Compare the run folders given on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (each with a history.json)")
    parser.add_argument("--out", type=Path, default=Path("outputs/compare"), help="folder for compare.png/.md")
    args = parser.parse_args(argv)
    text = compare(args.runs, args.out)
    print(text)
    return text


if __name__ == "__main__":
    main()
