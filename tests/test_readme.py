"""README's research-API example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(minilm_dir, capsys):
    code = re.search(r"## Research API\n\n```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "(2, 7, 384) (2, 384)" in printed
    assert namespace["logits"].shape == (2, 3)


def test_readme_starts_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).splitlines()
    assert first_block[0].startswith("pip install -e . && python -m flaxbert.pretrain")
    assert "python -m pytest" in first_block[1]
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert first_block[1].split("&&")[1].split("#")[0].strip() in ci
