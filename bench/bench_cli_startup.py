"""How long the quick ``reid-ms`` commands take to answer, against the cost of importing torch.

Each command runs in a fresh process (the installed ``reid-ms`` script, as a user's shell starts it), timed in alternation with ``python -c "import torch"`` (median of ``--rounds``; the order flips every
round so machine load hits all alike). The quick commands import neither torch nor the model code, so
their ratio to the torch import is what the lazy imports save.

    python bench/bench_cli_startup.py --rounds 7
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from common import interleaved

SCRIPT = str(Path(sys.executable).with_name("reid-ms"))
COMMANDS = {
    "reid-ms --help": [SCRIPT, "--help"],
    "reid-ms --version": [SCRIPT, "--version"],
    "reid-ms list": [SCRIPT, "list"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    run = {name: (lambda a=cmd: subprocess.run(a, check=True, capture_output=True))
           for name, cmd in COMMANDS.items()}
    times = interleaved(run, rounds=args.rounds)
    torch_import = times["python -c 'import torch'"]
    print(f"| command | seconds (median of {args.rounds}) | / import torch |")
    print("|---|---|---|")
    for name, seconds in times.items():
        print(f"| `{name}` | {seconds:.2f} | {seconds / torch_import:.2f} |")


if __name__ == "__main__":
    main()
