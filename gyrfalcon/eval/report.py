"""The results table printed by `gyrfalcon eval`."""

from __future__ import annotations

from typing import Any


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def format_results(out: dict[str, Any], subjects: bool = False) -> str:
    """task | shots | metric | value | stderr | n, then MMLU's categories, then the leaderboard average."""
    rows: list[tuple[str, str, str, str, str, str]] = []
    for name, r in out["results"].items():
        first = True
        for metric, m in r["metrics"].items():
            rows.append((name if first else "", str(r["num_fewshot"]) if first else "", metric, _num(m["value"]),
                         f"± {_num(m['stderr'])}" if m["stderr"] is not None else "", str(r["n"]) if first else ""))
            first = False
        cats = r.get("breakdown", {}).get("categories", {})
        if len(cats) > 1 or (cats and subjects):
            for cat, c in cats.items():
                rows.append((f"  {name}/{cat}", "", "acc", _num(c["acc"]),
                             f"± {_num(c['stderr'])}" if c["stderr"] is not None else "", str(c["n"])))
        if subjects:
            for subj, s in r.get("breakdown", {}).get("subjects", {}).items():
                rows.append((f"    {subj}", "", "acc", _num(s["acc"]),
                             f"± {_num(s['stderr'])}" if s["stderr"] is not None else "", str(s["n"])))
    header = ("task", "shots", "metric", "value", "stderr", "n")
    widths = [max(len(str(x[i])) for x in [header, *rows]) for i in range(len(header))]
    right = {1, 3, 5}

    def line(cells) -> str:
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    lines = [line(header), line(["-" * w for w in widths])]
    lines += [line(r) for r in rows]
    avg = out.get("leaderboard_average")
    if avg:
        parts = ", ".join(f"{t} {u['metric']}" for t, u in avg["tasks"].items())
        lines.append("")
        lines.append(f"Open LLM Leaderboard (v1) average over {len(avg['tasks'])} of {avg['of']} tasks "
                     f"({parts}): {avg['value']:.4f}")
        off = [t for t, u in avg["tasks"].items() if u["num_fewshot"] != u["leaderboard_num_fewshot"]]
        if off:
            lines.append(f"  note: {', '.join(off)} ran with other shots than the leaderboard's")
    if out["data"]["is_sample"]:
        lines.append("")
        lines.append(f"note: scored on the small data sample bundled with gyrfalcon ({out['data']['dir']}); "
                     "pass --data-dir for the full sets")
    if out["config"].get("limit") is not None:
        lines.append(f"note: --limit {out['config']['limit']}: a partial run, not comparable to full-set numbers")
    return "\n".join(lines)
