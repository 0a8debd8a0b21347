"""scripts/pass_at_k.py on a results file with a known answer."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pass_at_1_and_k_per_task(tmp_path):
    rows = [("counting", 0, [0, 0, 0, 0]), ("counting", 1, [1, 0, 0, 0]),  # pass@1 (0 + .25)/2, pass@k 0.5
            ("position", 2, [1, 1, 0, 0])]                                   # pass@1 0.5, pass@k 1
    with open(tmp_path / "results.jsonl", "w") as f:
        for tag, i, strict in rows:
            for k, s in enumerate(strict):
                f.write(json.dumps({"tag": tag, "prompt_index": i, "image_index": k, "strict": s}) + "\n")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "pass_at_k.py"), str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    assert "| counting | 0.125 | 0.500 |" in out and "| position | 0.500 | 1.000 |" in out
    assert "| **mean** | 0.312 | 0.750 |" in out
