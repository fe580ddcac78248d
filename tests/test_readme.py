"""What a user decides by is in the README: hardware and download tables, both papers with BibTeX, a license, and
install blocks that do not mix CPU and GPU lines."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def table_after(heading: str) -> list[list[str]]:
    """Rows of the first markdown table after the line starting with `heading` (header row included)."""
    start = README.index(heading)
    rows = []
    for line in README[start:].splitlines()[1:]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    return [row for row in rows if not set("".join(row)) <= set("-: ")]


def test_both_papers_are_linked_and_cited():
    for arxiv in ("2512.04678", "2601.16933"):
        assert f"https://arxiv.org/abs/{arxiv}" in README
    (bibtex,) = code_blocks("bibtex")
    entries = re.findall(r"@article\{(\w+),(.*?)\n\}", bibtex, re.S)
    assert [key for key, _ in entries] == ["lu2025rewardforcing", "zhang2026rewardforcing"]
    assert "arXiv:2512.04678" in entries[0][1] and "Lu, Yunhong" in entries[0][1]
    assert "arXiv:2601.16933" in entries[1][1] and "Zhang, Jingran" in entries[1][1]
    assert "https://github.com/JaydenLyh/Reward-Forcing" in README


def test_the_license_is_apache_2():
    text = (REPO / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "[LICENSE](LICENSE)" in README


def test_gpu_memory_downloads_and_training_time_are_tabulated():
    memory = table_after("GPU memory (peak, one GPU)")
    assert memory[0] == ["run", "GPU memory", "source"]
    assert any("inference" in row[0] and row[1] == "17.7 GB" for row in memory)
    assert any("training" in row[0] and row[1] == "56.7 GB" for row in memory)
    downloads = table_after("Downloads (")
    parts = {row[0].split()[0].strip("`") for row in downloads[1:]}
    assert {"wan-1.3b", "wan-14b", "imagereward"} <= parts
    assert all(row[3] or row[2] == "not looked up" for row in downloads[1:])  # every size has a source
    training = table_after("Training time")
    assert training[0] == ["preset", "GPUs", "time", "source"] and len(training) >= 4
    assert all(row[3] or row[2] == "not measured" for row in training[1:])


def test_install_blocks_keep_cpu_and_gpu_lines_apart():
    install = README[README.index("## Install"):README.index("## What it takes")]
    blocks = re.findall(r"```bash\n(.*?)```", install, re.S)
    assert len(blocks) == 2
    cpu, gpu = blocks
    assert "download.pytorch.org/whl/cpu" in cpu and "download.pytorch.org/whl/cpu" not in gpu
    assert "pip install torch\n" in gpu or "pip install torch " in gpu
    assert all("pip install -e" in block for block in blocks)
