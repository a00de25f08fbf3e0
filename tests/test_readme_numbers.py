"""Every number the README's results section quotes is in the committed results file it links.

The section is the README's first heading with "Results" in it, down to the next heading of the
same or a higher level. It is read item by item (a bullet with its continuation lines, a table row,
a paragraph); each item that states a number must link (markdown link) to files under
benchmarks/results/, and each of its numbers must be found in one of them, as written or as the
file's value rounded to the README's digits (26% matches 0.2618 or 26.2%; 1.2x matches 1.22x).
Numbers inside identifiers (ResNet-18, ViT-B/16, sm_90, 3x3) and inline code are not results.

    python tests/test_readme_numbers.py            # print what fails
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")
NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")
SCALE = {"M": 1e6, "G": 1e9}  # 11.69M params, 4.1G MACs


@dataclass(frozen=True)
class Quoted:
    """A number as the README writes it."""

    text: str
    value: float
    half_unit: float  # half of its last digit: how far a file's value may be and still round to it
    percent: bool


def results_section(readme: str) -> str:
    lines = readme.splitlines()
    for start, line in enumerate(lines):
        heading = re.match(r"(#+)\s", line)
        if heading and "results" in line.lower():
            level = len(heading.group(1))
            end = next((i for i in range(start + 1, len(lines))
                        if (h := re.match(r"(#+)\s", lines[i])) and len(h.group(1)) <= level), len(lines))
            return "\n".join(lines[start + 1:end])
    return ""


def items(section: str) -> list[str]:
    """Bullets with their continuation lines, table rows and paragraphs, one string each."""
    out: list[str] = []
    for line in section.splitlines():
        stripped = line.strip()
        if not stripped or re.fullmatch(r"\|?[\s:|-]+\|?", stripped):  # blank or a table's rule
            out.append("")
        elif stripped.startswith(("- ", "* ", "|")) or re.match(r"\d+\.\s", stripped) or not out or not out[-1]:
            out.append(stripped)
        else:
            out[-1] += " " + stripped
    return [item for item in out if item]


def quoted_numbers(item: str) -> list[Quoted]:
    text = re.sub(r"`[^`]*`", " ", item)  # inline code: names and flags, not results
    text = LINK.sub(lambda m: f" {m.group(1)} ", text)  # link targets are paths
    found = []
    for match in NUMBER.finditer(text):
        start, end, raw = match.start(), match.end(), match.group()
        if raw.startswith("-") and start > 0 and text[start - 1].isdigit():
            start, raw = start + 1, raw[1:]  # a range, 30-42%: the dash is not a sign
        before = text[start - 1] if start else " "
        before2 = text[start - 2] if start > 1 else " "
        after = text[end] if end < len(text) else " "
        after2 = text[end + 1] if end + 1 < len(text) else " "
        if before.isalpha() or before in "_." or (before in "-/" and before2.isalpha()):
            continue  # ResNet-18, ViT-B/16, v9, .py
        if after in "_" or (after == "." and after2.isdigit()) or (after == "/" and after2.isalpha()):
            continue  # x1_0, 2.14.1
        if after.isalpha() and after not in "xMG" or after in "xMG" and (after2.isalnum() or after2 == "_"):
            continue  # 3x3, 16x1, H200-like tails, 5th
        found.append(_quoted(raw, SCALE.get(after, 1.0), after == "%"))
    return found


def _quoted(raw: str, scale: float, percent: bool) -> Quoted:
    digits = raw.replace(",", "")
    mantissa, _, exponent = digits.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    unit = 10.0 ** (-decimals + (int(exponent) if exponent else 0))
    return Quoted(raw, float(digits) * scale, 0.5 * unit * scale * (1 + 1e-9), percent)


def file_values(path: Path) -> list[float]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    values = []
    for file in files:
        if file.suffix in (".json", ".md", ".csv", ".txt"):
            values += [float(m.replace(",", "")) for m in NUMBER.findall(file.read_text(errors="replace"))]
    return values


def holds(quote: Quoted, values: list[float]) -> bool:
    candidates = [quote.value] + ([quote.value / 100] if quote.percent else [])
    halves = [quote.half_unit] + ([quote.half_unit / 100] if quote.percent else [])
    return any(math.isclose(abs(v), abs(c), rel_tol=0, abs_tol=h) or abs(abs(v) - abs(c)) <= h
               for c, h in zip(candidates, halves) for v in values)


def check(readme_path: Path) -> list[str]:
    """One line per number of the results section that no linked results file holds."""
    failures = []
    for item in items(results_section(readme_path.read_text())):
        numbers = quoted_numbers(item)
        if not numbers:
            continue
        linked = [(readme_path.parent / target.split("#")[0]).resolve() for _, target in LINK.findall(item)
                  if "benchmarks/results/" in target]
        missing = [p for p in linked if not p.exists()]
        if not linked or missing:
            why = f"links a missing file {missing[0]}" if missing else "no link to a benchmarks/results/ file"
            failures.append(f"{why}: {item[:100]}...")
            continue
        values = [v for path in linked for v in file_values(path)]
        failures += [f"{q.text} not in {', '.join(p.name for p in linked)}: {item[:80]}..."
                     for q in numbers if not holds(q, values)]
    return failures


def _write(tmp_path: Path, readme: str, results: dict[str, str]) -> Path:
    for name, text in results.items():
        (tmp_path / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
        (tmp_path / "benchmarks" / "results" / name).write_text(text)
    (tmp_path / "README.md").write_text(readme)
    return tmp_path / "README.md"


def test_numbers_found_as_written_or_rounded(tmp_path: Path) -> None:
    readme = _write(tmp_path, "# x\n\n## Results\n\n- ResNet-18 keeps 26% of its MACs, 1.2x faster, error 4e-7 "
                    "([table](benchmarks/results/a.json)).\n\n## Other\n\n- 99 things\n",
                    {"a.json": '{"macs": 0.2618, "speedup": 1.22, "err": 4.2e-07}'})
    assert check(readme) == []


def test_a_number_the_file_lacks_or_an_unlinked_claim_fails(tmp_path: Path) -> None:
    readme = _write(tmp_path, "## Results\n\n- 0.75 s to prune ([t](benchmarks/results/a.md))\n"
                    "- within 4% at ratios 0-0.5\n",
                    {"a.md": "| resnet50 | 4.51 |\n"})
    failures = check(readme)
    assert len(failures) == 2
    assert failures[0].startswith("0.75 not in a.md") and "no link" in failures[1]


def test_identifiers_and_code_are_not_results() -> None:
    texts = [q.text for q in quoted_numbers("ResNet-18 and ViT-B/16 on sm_90 with `--threads 1`, 3x3 convs: "
                                            "1.48x, 30-42%, 1,814M, 83/83")]
    assert texts == ["1.48", "30", "42", "1,814", "83", "83"]


def test_readme_results_are_in_the_files_they_link() -> None:
    failures = check(ROOT / "README.md")
    assert not failures, f"{len(failures)} numbers not traceable:\n" + "\n".join(failures)


if __name__ == "__main__":
    problems = check(ROOT / "README.md")
    print("\n".join(problems) or "every number traced")
    sys.exit(1 if problems else 0)
