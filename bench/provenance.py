"""
What a run measured with: the code it ran and the machine it ran on.

What this module owns: copying the checkout's egressproxy package and twistd
plugin into the run's directory (with ``git diff`` of what is uncommitted),
and describing the machine and the tools' versions for the report. Why: the
checkout changes under a long run (other engineers edit it), and a figure is
only worth keeping with the code and the machine that produced it.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import procs

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snapshot_code(run_dir: str) -> str:
    """
    Copy the checkout's egressproxy package and twistd plugin into the run.

    Every instance of the run then runs the same code even while the checkout
    is being edited, and the run keeps a record of what it measured (with
    ``git diff`` of uncommitted changes in egressproxy.diff).
    """
    src = os.path.join(run_dir, "src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache")
    shutil.copytree(os.path.join(REPO_ROOT, "egressproxy"), os.path.join(src, "egressproxy"), ignore=ignore)
    shutil.copytree(os.path.join(REPO_ROOT, "twisted", "plugins"), os.path.join(src, "twisted", "plugins"), ignore=ignore)
    diff = ""
    for argv in (
        ["git", "-C", REPO_ROOT, "status", "--short", "--untracked-files=all", "--", "egressproxy", "twisted"],
        ["git", "-C", REPO_ROOT, "diff", "HEAD", "--", "egressproxy", "twisted"],
    ):
        try:
            diff += subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL).stdout
        except (OSError, subprocess.SubprocessError):
            pass
    with open(os.path.join(run_dir, "egressproxy.diff"), "w", encoding="utf-8") as f:
        f.write(diff)
    return src


def _first_line(argv: list[str], cwd: str | None = None) -> str:
    """
    The first line a command prints, or why there is none.
    """
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, cwd=cwd)
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({e})"
    if result.returncode != 0:
        return "unknown"
    text = (result.stdout or result.stderr).strip()
    return text.splitlines()[0] if text else ""


def machine_info(pg_bindir: str | None, code_root: str) -> dict[str, str]:
    """
    The machine, the tools and the code a run measured, as ``name: text`` for the report.
    """
    cpu = "?"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            mem = f"{int(f.readline().split()[1]) / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    socat = "?"
    try:
        out = subprocess.run(["socat", "-V"], capture_output=True, text=True, timeout=30).stdout
        socat = next((ln.strip() for ln in out.splitlines() if "socat version" in ln), "?")
    except (OSError, subprocess.SubprocessError):
        socat = "not found"
    commit = _first_line(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"])
    dirty = _first_line(["git", "-C", REPO_ROOT, "status", "--porcelain", "--untracked-files=all", "--", "egressproxy", "twisted"])
    try:
        import twisted

        twisted_version = twisted.__version__
    except ImportError:
        twisted_version = "?"
    return {
        "cpus": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "os": _first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": sys.version.split()[0] + f" ({sys.executable})",
        "twisted": twisted_version,
        "egressproxy": commit + ("" if dirty in ("", "unknown") else " plus uncommitted changes (see egressproxy.diff; the code ran from src/, copied at the start)"),
        "egressproxy imported from": _first_line(
            ["env", f"PYTHONPATH={code_root}", sys.executable, "-c", "import egressproxy; print(egressproxy.__file__)"],
            cwd=os.path.dirname(code_root),
        ),
        "haproxy": _first_line(["haproxy", "-v"]),
        "socat": socat,
        "iperf3": _first_line(["iperf3", "-v"]),
        "pgbench": _first_line(["pgbench", "-V"]),
        "postgres": _first_line([os.path.join(pg_bindir, "postgres"), "-V"]) if pg_bindir else "?",
        "descriptor limit": str(procs.nofile_limit(os.getpid())),
    }
