#!/usr/bin/env python
"""Write (and optionally submit) one SLURM job array whose element i runs command i.

Used by ``scripts/vtab_all.sh --slurm`` and ``scripts/sweep.py --slurm``; usable alone::

    printf '%s\\n' "cmd one" "cmd two" | python scripts/slurm_array.py --out job.sbatch --name myjob \\
        [--log-dir DIR] [--gpus N] [--processes P --workers W] [--mem 64G] [--sbatch=--partition=gpu ...] \\
        [--cd DIR] [--env KEY=VALUE ...] [--submit]

Each input line is one element's command, already quoted for bash. The script runs element
``$SLURM_ARRAY_TASK_ID`` (so ``SLURM_ARRAY_TASK_ID=3 bash job.sbatch`` runs element 3 without SLURM).
Every command is expected to skip what is finished and resume what is not, so that submitting the same
array again is safe. With ``--workers`` an element asks for ``--cpus-per-task`` = processes × (workers + 1)
(each training process and its DataLoader workers get a core; SLURM's default is one core in all), and
``--mem`` for its memory (the config key ``train.slurm_mem``). sbatch options on its command line override
the ``#SBATCH`` lines, e.g. ``sbatch --array=0-341%20 job.sbatch`` to run at most 20 elements at a time.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["cpus_per_task", "render", "write_array", "submit", "main"]


def cpus_per_task(processes: int, workers: int) -> int:
    """Cores of one element: each training process and each of its DataLoader workers."""
    return max(1, processes) * (max(0, workers) + 1)


def render(commands: Sequence[str], name: str, log_dir: str | os.PathLike, gpus: int = 1,
           sbatch_options: Sequence[str] = (), cwd: str | os.PathLike | None = None,
           env: Sequence[str] = (), description: str = "", cpus: int | None = None, mem: str = "") -> str:
    """The text of the array script (see the module docstring); ``cpus`` / ``mem``: the element's
    ``--cpus-per-task`` / ``--mem`` (None / "": SLURM's default), unless ``sbatch_options`` give them."""
    if not commands:
        raise ValueError("a job array needs at least one command")
    options = list(sbatch_options)
    header = [f"#SBATCH --job-name={name}", f"#SBATCH --array=0-{len(commands) - 1}",
              f"#SBATCH --output={Path(log_dir) / '%x_%A_%a.out'}"]
    if gpus > 0 and not any(o.startswith(("--gres", "--gpus", "-G")) for o in options):
        header.append(f"#SBATCH --gres=gpu:{gpus}")
    if cpus is not None and not any(o.startswith(("--cpus-per-task", "-c")) for o in options):
        header.append(f"#SBATCH --cpus-per-task={cpus}")
    if mem and not any(o.startswith("--mem") for o in options):
        header.append(f"#SBATCH --mem={mem}")
    header += [f"#SBATCH {o}" for o in options]
    lines = ["#!/usr/bin/env bash"]
    lines += [f"# {line}".rstrip() for line in description.strip().splitlines()] if description else []
    lines += [f"# {len(commands)} element(s), one run each; element i runs command i below.",
              "# Submit: sbatch THIS_FILE (again at any time: finished runs are skipped, unfinished ones resume).",
              "# One element without SLURM: SLURM_ARRAY_TASK_ID=<i> bash THIS_FILE"]
    lines += header
    lines += ["set -euo pipefail"]
    if cwd is not None:
        lines.append(f"cd {shlex.quote(str(cwd))}")
    for item in env:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--env {item!r}: expected KEY=VALUE")
        lines.append(f'export {key}="${{{key}:-{value}}}"' if not set(value) & set('$"\\`')
                     else f"export {key}={shlex.quote(value)}")
    lines += [f'i="${{SLURM_ARRAY_TASK_ID:?set SLURM_ARRAY_TASK_ID to an element, 0-{len(commands) - 1}}}"',
              f'echo "[slurm array] element $i of 0-{len(commands) - 1} on $(hostname)" >&2',
              'case "$i" in']
    for i, command in enumerate(commands):
        lines.append(f"    {i}) exec {command} ;;")
    lines += [f'    *) echo "no element $i in this array (0-{len(commands) - 1})" >&2; exit 2 ;;', "esac", ""]
    return "\n".join(lines)


def write_array(path: str | os.PathLike, commands: Sequence[str], name: str,
                log_dir: str | os.PathLike | None = None, **kwargs) -> Path:
    """Write the script (executable) and create its log folder (default: the script's folder)."""
    path = Path(path)
    log_dir = Path(log_dir) if log_dir else path.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render(commands, name, log_dir.resolve(), **kwargs), encoding="utf-8")
    tmp.chmod(0o755)
    os.replace(tmp, path)
    return path


def submit(path: str | os.PathLike, extra: Sequence[str] = ()) -> str:
    """``sbatch --parsable [extra] path``; returns the job id. Raises RuntimeError without sbatch."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise RuntimeError(f"sbatch not found: submit {path} on the cluster with `sbatch {path}`")
    proc = subprocess.run([sbatch, "--parsable", *extra, str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the script to write")
    p.add_argument("--name", required=True, help="the job name")
    p.add_argument("--log-dir", help="folder of the elements' output files (default: the script's folder)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per element (#SBATCH --gres=gpu:N; 0: none)")
    p.add_argument("--processes", type=int, default=None,
                   help="training processes per element (default: --gpus, at least 1)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers per process: request --cpus-per-task = processes x (workers + 1)")
    p.add_argument("--mem", default="", help="memory per element (#SBATCH --mem, e.g. 64G)")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="an extra #SBATCH line, e.g. --sbatch=--partition=gpu (repeatable)")
    p.add_argument("--cd", help="folder the elements run in")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="exported in the script (a value set in the job's environment wins)")
    p.add_argument("--description", default="", help="comment lines at the top of the script")
    p.add_argument("--submit", action="store_true", help="submit the array with sbatch")
    args = p.parse_args(argv)
    commands: list[str] = [line for line in sys.stdin.read().splitlines() if line.strip()]
    try:
        processes = args.processes if args.processes is not None else max(1, args.gpus)
        cpus = cpus_per_task(processes, args.workers) if args.workers is not None else None
        path = write_array(args.out, commands, args.name, args.log_dir, gpus=args.gpus,
                           sbatch_options=args.sbatch, cwd=args.cd, env=args.env, description=args.description,
                           cpus=cpus, mem=args.mem)
    except ValueError as e:
        print(f"slurm_array.py: {e}", file=sys.stderr)
        return 2
    print(f"[slurm] wrote {path}: {len(commands)} element(s)", file=sys.stderr)
    if args.submit:
        try:
            job = submit(path)
        except RuntimeError as e:
            print(f"[slurm] {e}", file=sys.stderr)
            return 1
        print(f"[slurm] submitted job array {job} ({len(commands)} element(s))", file=sys.stderr)
        print(job)
    return 0


if __name__ == "__main__":
    sys.exit(main())
