"""CPU time and memory of a process and its descendants, read from /proc (Linux only)."""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may hold spaces: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def tree(pid: int) -> list[int]:
    """pid and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime (+ reaped children's) of the process tree, all threads included."""
    total = 0
    for p in tree(pid):
        fields = _stat_fields(p)
        if fields is not None:
            # Fields 14-17 of /proc/PID/stat (1-based): utime stime cutime cstime.
            total += sum(int(x) for x in fields[11:15])
    return total / CLK_TCK


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) summed over the tree, in kB."""
    out = {"VmRSS": 0, "VmHWM": 0}
    for p in tree(pid):
        try:
            text = Path(f"/proc/{p}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in text.splitlines():
            name, _, value = line.partition(":")
            if name in out:
                out[name] += int(value.split()[0])
    return out


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (writing 5 to clear_refs); False if not permitted."""
    ok = True
    for p in tree(pid):
        try:
            Path(f"/proc/{p}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


def main_thread_cpu_seconds(pid: int) -> float:
    """CPU of the process's main thread alone (the event loop, for an asyncio server)."""
    fields = _stat_fields_path(f"/proc/{pid}/task/{pid}/stat")
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / CLK_TCK


def _stat_fields_path(path: str) -> list[str] | None:
    try:
        raw = Path(path).read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rindex(")") + 2 :].split()


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat.

    Busy counts user, nice and system time; interrupt and softirq time (much of the
    loopback network stack's work) is left out, since no process is charged for it.
    """
    values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = (values + [0] * 8)[:8]
    return (user + nice + system) / CLK_TCK, steal / CLK_TCK
