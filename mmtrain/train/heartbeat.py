"""Heartbeats and the hang watchdog: a stuck or dead rank is named in `OUT/hang-report.txt`, and the job exits.

On a cluster the costly failure is the silent one: a rank dies or blocks, and the others wait at a collective until
the job's time limit. Every rank keeps `OUT/heartbeat/rank-N.json` up to date from two places:
  - the training loop records each phase change (data, forward, backward, optimizer, save) with the step and the
    last batch's composition: that is *progress* (kept in memory; only the rare phases are written at once);
  - a daemon thread, every few seconds, writes the file stamped `alive`: it keeps running while the main thread waits inside a
    collective, so a rank whose `alive` goes stale is dead or frozen, not merely waiting.
The same thread is the watchdog: no progress for `hang_timeout_s` → it writes the report (every rank's last heartbeat,
which ranks are silent or behind, this process's Python stacks by faulthandler) and ends the process with
`HANG_EXIT_CODE`, so a scheduler can requeue (`--resume` then continues from the last complete checkpoint).
The heartbeat folder must be on a filesystem every rank sees (the run directory on a cluster's shared storage).
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

HANG_EXIT_CODE = 3
REPORT = "hang-report.txt"


def heartbeat_dir(out: Path) -> Path:
    return out / "heartbeat"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_heartbeats(out: Path) -> dict[int, dict[str, Any]]:
    """Every rank's last heartbeat (ranks whose file is missing or half-written are left out)."""
    beats = {}
    folder = heartbeat_dir(out)
    if folder.is_dir():
        for path in folder.glob("rank-*.json"):
            try:
                beat = json.loads(path.read_text(encoding="utf-8"))
                beats[int(beat["rank"])] = beat
            except (OSError, ValueError, KeyError):
                continue
    return beats


def pid_alive(pid: int) -> bool:
    """Whether a process of this host runs (a zombie, killed but not yet reaped by its launcher, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def silent_ranks(beats: dict[int, dict[str, Any]], world_size: int, stale_after: float,
                 now: float | None = None) -> dict[int, str]:
    """Ranks that stopped stamping `alive` (dead or frozen), with why we think so. A rank on this host whose pid is
    gone is dead at once; elsewhere its stamp must be older than `stale_after` seconds."""
    now = time.time() if now is None else now
    host = socket.gethostname()
    found = {}
    for rank in range(world_size):
        beat = beats.get(rank)
        if beat is None:
            found[rank] = "never wrote a heartbeat"
            continue
        age = now - float(beat["alive"])
        if beat.get("host") == host and not pid_alive(int(beat["pid"])):
            found[rank] = f"process {beat['pid']} on {host} is gone (last alive {age:.0f} s ago)"
        elif age > stale_after:
            found[rank] = f"no heartbeat for {age:.0f} s (dead, frozen or cut off)"
    return found


PHASES = ("startup", "build", "data", "forward", "backward", "optimizer", "save", "barrier", "done", "stopped")
"""In the order a step goes through them: a rank still loading data while the others wait in forward is behind."""
SLOW_PHASES = ("startup", "build", "save", "barrier", "done", "stopped")
"""Phases written to the file at once; the per-micro-batch ones are written by the stamping thread (every interval),
so the hot loop never touches the (often shared, networked) filesystem."""


def behind_ranks(beats: dict[int, dict[str, Any]]) -> list[int]:
    """Ranks at an earlier (stage, step, phase) than the furthest rank: the ones the others wait for."""
    if not beats:
        return []
    order = {name: i for i, name in enumerate(PHASES)}
    position = {r: (int(b.get("stage_index", -1)), int(b.get("step", -1)), order.get(b.get("phase"), -1))
                for r, b in beats.items()}
    furthest = max(position.values())
    return sorted(r for r, p in position.items() if p < furthest)


def format_report(out: Path, rank: int, world_size: int, reason: str, stale_after: float) -> str:
    beats = read_heartbeats(out)
    silent = silent_ranks(beats, world_size, stale_after)
    now = time.time()
    lines = [f"mmtrain hang report, written by rank {rank} (pid {os.getpid()} on {socket.gethostname()}) at "
             f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}", f"reason: {reason}", ""]
    if silent:
        lines.append("silent ranks: " + ", ".join(f"rank {r}" for r in sorted(silent)))
        lines += [f"  rank {r}: {why}" for r, why in sorted(silent.items())]
    else:
        lines.append("silent ranks: none (every rank still stamps its heartbeat)")
    behind = [r for r in behind_ranks(beats) if r not in silent]
    if behind:
        lines.append("ranks behind the others: " + ", ".join(f"rank {r}" for r in behind))
    lines += ["", "last heartbeat of every rank:"]
    for r in range(world_size):
        beat = beats.get(r)
        if beat is None:
            lines.append(f"  rank {r}: none")
            continue
        lines.append(f"  rank {r}: stage {beat.get('stage')} step {beat.get('step')} phase {beat.get('phase')} "
                     f"for {now - float(beat['phase_since']):.0f} s, alive {now - float(beat['alive']):.0f} s ago, "
                     f"host {beat.get('host')} pid {beat.get('pid')}, last batch {json.dumps(beat.get('batch'))}")
    return "\n".join(lines) + "\n"


class Heartbeat:
    """This rank's heartbeat file, its `alive` thread and the watchdog. `phase()` is the only call the loop makes."""

    def __init__(self, out: Path, rank: int, world_size: int, hang_timeout_s: float,
                 on_hang: Callable[[int], None] | None = None) -> None:
        self.out, self.rank, self.world_size = out, rank, world_size
        self.hang_timeout_s = float(hang_timeout_s)
        self.interval = max(0.5, min(10.0, self.hang_timeout_s / 10))
        self.stale_after = 3 * self.interval + 1
        self.on_hang = on_hang or os._exit
        self.path = heartbeat_dir(out) / f"rank-{rank}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.state: dict[str, Any] = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "stage": None,
                                      "stage_index": -1, "step": 0, "phase": "startup", "phase_since": now,
                                      "alive": now, "batch": None}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._write()
        self._thread = threading.Thread(target=self._watch, name="mmtrain-heartbeat", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        with self._lock:
            self.state["alive"] = time.time()
            _write_atomic(self.path, json.dumps(self.state, sort_keys=True))

    def phase(self, phase: str, *, stage: str | None = None, stage_index: int | None = None, step: int | None = None,
              batch: dict[str, Any] | None = None) -> None:
        """The loop moved on: record where it is now (this is what counts as progress)."""
        with self._lock:
            if stage is not None:
                self.state["stage"] = stage
            if stage_index is not None:
                self.state["stage_index"] = stage_index
            if step is not None:
                self.state["step"] = step
            if batch is not None:
                self.state["batch"] = batch
            self.state["phase"] = phase
            self.state["phase_since"] = time.time()
        if phase in SLOW_PHASES:  # the others, several per micro-batch, reach the file with the next stamp
            self._write()

    def report(self, reason: str, failure: str | None = None) -> Path:
        """Write `OUT/hang-report.txt` (+ this rank's stacks) and return its path. Waits until a dead peer's stamp
        is conclusively stale, so the report can name it. `failure` is the traceback of the exception that stopped
        this rank, when one did: the stacks alone show only where the report was written."""
        deadline = time.time() + self.stale_after + 1
        while time.time() < deadline and not silent_ranks(read_heartbeats(self.out), self.world_size,
                                                          self.stale_after):
            time.sleep(0.5)
        text = format_report(self.out, self.rank, self.world_size, reason, self.stale_after)
        if failure:
            text += f"\nTraceback of the failure on rank {self.rank}:\n{failure}"
        stacks = self.out / f"hang-stacks-rank-{self.rank}.txt"
        with open(stacks, "w", encoding="utf-8") as f:
            faulthandler.dump_traceback(file=f, all_threads=True)
        text += f"\nPython stacks of rank {self.rank} (all threads):\n" + stacks.read_text(encoding="utf-8")
        path = self.out / REPORT
        _write_atomic(path, text)
        _write_atomic(self.out / f"hang-report-rank-{self.rank}.txt", text)
        first = text.split("\n\nlast heartbeat")[0]
        print(f"[rank {self.rank}] {first}\n[rank {self.rank}] full report: {path}", file=sys.stderr, flush=True)
        return path

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._write()
            except OSError:
                continue  # a full disk must not kill the watchdog; the report write will say more
            stuck_for = time.time() - float(self.state["phase_since"])
            if stuck_for > self.hang_timeout_s and not self._stop.is_set():
                try:
                    self.report(f"rank {self.rank} made no progress for {stuck_for:.0f} s (hang_timeout_s "
                                f"{self.hang_timeout_s:.0f}) in phase {self.state['phase']!r} of step "
                                f"{self.state['step']}")
                finally:
                    self.on_hang(HANG_EXIT_CODE)
                return

    def close(self, phase: str = "done") -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)
        self.phase(phase)
