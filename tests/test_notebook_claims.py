"""A notebook's sentence about its run is printed by util.expect from the run's own numbers; the
committed notebooks (a real `make run`, tiny preset) must show every such sentence as seen, so a
recipe change that makes one false fails here until the text changes."""
import json
import re
from pathlib import Path

import pytest

import util
from rlhf.plotting import MISSED, SEEN

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(ROOT.glob("[0-9]_*.ipynb"))


def printed(nb: dict) -> list[str]:
    """Every line a notebook's cells printed (stream outputs)."""
    lines = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                lines += "".join(out.get("text", "")).splitlines()
    return lines


def claims(path: Path) -> tuple[int, list[str], list[str]]:
    """(expect calls in the sources, claims seen, claims not seen) of one notebook."""
    nb = json.loads(path.read_text())
    calls = sum(len(re.findall(r"\butil\.expect\(", "".join(c["source"])))
                for c in nb["cells"] if c["cell_type"] == "code")
    lines = printed(nb)
    return (calls, [x for x in lines if x.startswith(SEEN)],
            [x for x in lines if x.startswith(MISSED)])


def test_expect_says_seen_or_not_seen_and_never_raises(capsys):
    assert util.expect(2 > 1, "two is more than one") is True
    assert util.expect(0.3 > 0.5, "the clip acts often", "it seldom does") is False
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{SEEN} two is more than one",
                   f"{MISSED} the clip acts often (it seldom does)"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_committed_run_shows_every_claim_its_notebook_makes(path):
    calls, seen, missed = claims(path)
    assert not missed, f"{path.name}: the committed run does not show what the text says: {missed}"
    # every expect() in the sources printed its line: the outputs are those of this code
    assert len(seen) >= calls, f"{path.name}: {calls} claims in the code, {len(seen)} printed"


def test_the_notebooks_check_their_claims():
    total = sum(claims(p)[0] for p in NOTEBOOKS)
    assert total >= 8, total                         # 3_rlhf and 6_grpo above all


def test_a_falsified_claim_fails(tmp_path):
    """The check itself can fail: a committed output with a claim not seen."""
    nb = json.loads(NOTEBOOKS[0].read_text())
    nb["cells"].append({"cell_type": "code", "source": "util.expect(False, 'x')", "metadata": {},
                        "outputs": [{"output_type": "stream", "name": "stdout",
                                     "text": f"{MISSED} x\n"}], "execution_count": 1})
    bad = tmp_path / "9_bad.ipynb"
    bad.write_text(json.dumps(nb))
    with pytest.raises(AssertionError, match="does not show what the text says"):
        test_the_committed_run_shows_every_claim_its_notebook_makes(bad)
