"""Run the shell commands of README.md and docs/*.md against the reid-ms found on PATH, in a scratch folder.

    python .ci/doc_commands.py README.md docs/*.md      # CI runs it with a wheel's venv first on PATH

Commands are the lines of ```bash blocks and the ``$ `` lines of ```console blocks (with their ``\\``
continuations), run in order in one bash session (so ``S=...`` set in one block is seen by the next),
from an empty temporary directory: a command that only works from a source checkout fails here. Lines that
set up an environment (venv, pip install, the test suite) or need what a user brings (a data set, GPUs,
the repository's examples/) are listed as skipped, with the reason.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

SKIP = [
    (re.compile(r"\bpip install\b|-m venv\b"), "installs; CI installed the wheel itself"),
    (re.compile(r"\bpytest\b"), "the test suite; CI runs it from the checkout and the sdist"),
    (re.compile(r"\btorchrun\b|\bexamples/"), "needs the repository's examples/ and a data set or GPUs"),
    (re.compile(r"\breid-ms train\b"), "trains on a data set (Market-1501, or the synthetic set examples/ makes); "
                                        "tests/test_train.py runs it on a tiny one"),
]


def commands(page: Path) -> list[str]:
    text = page.read_text()
    found = []
    for lang, body in re.findall(r"```(bash|console)\n(.*?)```", text, re.S):
        lines = body.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            if lang == "console" and not line.startswith("$ "):
                i += 1
                continue
            command = line[2:] if lang == "console" else line
            while command.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                command = command.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            command = command.strip()
            if command and not command.startswith("#"):
                found.append(command)
    return found


def main(pages: list[str]) -> int:
    script = ["set -euo pipefail"]
    for page in map(Path, pages):
        for command in commands(page):
            reason = next((why for pattern, why in SKIP if pattern.search(command)), None)
            if reason:
                print(f"skipped ({page.name}): {command}\n    {reason}")
                continue
            script.append(f"echo {shlex_quote('+ ' + command)}")
            script.append(command)
    with tempfile.TemporaryDirectory(prefix="reid-ms-docs-") as tmp:
        print(f"running {sum(1 for s in script if s.startswith('echo'))} commands in {tmp}", flush=True)
        return subprocess.run(["bash", "-c", "\n".join(script)], cwd=tmp).returncode


def shlex_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
