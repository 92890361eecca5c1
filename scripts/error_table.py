"""Write docs/errors.md from tests/error_cases.py (the list tests/test_errors.py runs), or with --check exit 1
when the page is out of date. Usage: python scripts/error_table.py [--check]"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from error_cases import CASES, render  # noqa: E402


def main() -> int:
    page = ROOT / "docs" / "errors.md"
    text = render() + "\n"
    if "--check" in sys.argv[1:]:
        if not page.exists() or page.read_text() != text:
            print(f"{page} is out of date: run python scripts/error_table.py", file=sys.stderr)
            return 1
        return 0
    page.write_text(text)
    print(f"wrote {page} ({len(CASES)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
