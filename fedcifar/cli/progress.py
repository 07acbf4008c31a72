"""A run's progress as it goes: a progress bar and the round table (live on a terminal, line by line
otherwise), then a summary."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from fedcifar.cli.common import console


def round_table(rows: list[dict]) -> Table:
    table = Table(title="rounds", title_justify="left")
    for name in ("round", "train loss", "eval loss", "eval accuracy", "round s", "clients"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(
            str(r["round"]),
            f"{r['train_loss']:.4f}",
            f"{r['eval_loss']:.4f}",
            f"{100 * r['eval_accuracy']:.2f}%",
            f"{r['round_seconds']:.1f}",
            str(r["participating_clients"]),
        )
    return table


def follow_with_progress(fed, run_id: int, out_dir: Path, rounds: int) -> dict:
    """Follow the run: a progress bar and the round table, live on a terminal, line by line otherwise."""
    from rich.console import Group
    from rich.live import Live
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    rows: list[dict] = []
    progress = Progress(
        TextColumn(f"run {run_id}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )
    task = progress.add_task("rounds", total=rounds)
    live = Live(
        Group(progress, round_table(rows)),
        console=console,
        refresh_per_second=4,
        transient=False,
        auto_refresh=console.is_terminal,
    )

    def on_round(record: dict) -> None:
        rows.append(record)
        progress.update(task, completed=len(rows))
        if console.is_terminal:
            live.update(Group(progress, round_table(rows)))
        else:
            console.print(
                f"round {record['round']}/{rounds}: train loss {record['train_loss']:.4f}, "
                f"eval loss {record['eval_loss']:.4f}, eval accuracy {100 * record['eval_accuracy']:.2f}%, "
                f"{record['round_seconds']:.1f}s, {record['participating_clients']} clients"
            )

    def notice(text: str) -> None:
        console.print(f"[yellow]{text}[/]")

    if not console.is_terminal:
        return fed.follow(run_id, out_dir, on_round, on_notice=notice)
    with live:
        return fed.follow(run_id, out_dir, on_round, on_notice=notice)


def print_summary(history: dict, peak_rss: dict[str, int], out_dir: Path) -> None:
    rounds = history["rounds"]
    if not console.is_terminal:  # on a terminal the live table is still on screen
        console.print(round_table(rounds))
    if stopped := history.get("stopped"):
        console.print(f"[yellow]stopped after round {stopped['round']}:[/] {stopped['detail']}")
    if rounds:
        last = rounds[-1]
        console.print(f"final eval accuracy {100 * last['eval_accuracy']:.2f}%, eval loss {last['eval_loss']:.4f}")
    if peak_rss:
        console.print("peak RSS: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in sorted(peak_rss.items())))
    console.print(f"outputs: {out_dir / 'history.json'}, {out_dir / 'model.pt'}, {out_dir / 'history.png'}")
