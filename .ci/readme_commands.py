"""Print one of the README's two quick-start commands (``run`` or ``test``)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def quick_start_commands(text: str) -> list[str]:
    """Return the commands of the bash blocks in the README's "Quick start" section."""
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


if __name__ == "__main__":
    run_cmd, test_cmd = quick_start_commands(README.read_text())
    print({"run": run_cmd, "test": test_cmd}[sys.argv[1]])
