"""Every code block of README.md runs as written (issue #17).

The blocks are read out of the README itself, so a block added later is run too, or the test fails until
it is taught how (a language it does not know, a command it cannot run here). Bash blocks run through
``bash -euo pipefail`` in a fresh folder per block that holds the files the block names (``INPUTS``); the
Python blocks run in one namespace, the "Python API at a glance" block first because it defines
``adata``, ``model`` and ``labels`` that the others use. What cannot run here is listed, with the reason,
in ``NOT_RUN`` (whole commands) and ``SUBSTITUTED`` (one literal swapped for a cheaper one); both tables
must match the README, so that an entry left behind by an edit fails the test.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import langcell

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

README = Path(__file__).resolve().parents[2] / "README.md"

# Commands (a line with its backslash continuations) that are not run, matched by a stable substring.
NOT_RUN = {
    "pip install": "installs packages: the test runs in the environment it is given, with no network",
    "python -m pytest": "runs the whole test suite, this test included",
    "langcell demo": "pretrains the small model for minutes; tests/test_demo.py runs the same pipeline "
                     "(run_demo) with the test-sized recipe and checks its outputs",
    "pretrain --config small": "400 steps of the small model take many minutes on a CPU; the fixture "
                               "puts a tiny model from LangCell.from_config at run/model instead",
    "torchrun --nproc_per_node 8": "eight processes of the base model are meant for GPUs; the fixture "
                                   "puts a tiny model at run/model instead",
    "torchrun --nproc_per_node 4": "four torch processes on two CPU cores; tests/inference/"
                                   "test_distributed.py runs embed and annotate under torchrun",
    "tensorboard --logdir": "starts a server that never exits",
    "CENSUS=s3://": "the CELLxGENE Census needs the network (tests/data/test_soma.py reads a local "
                    "SOMA experiment)",
    'langcell tokenize "$CENSUS"': "the CELLxGENE Census needs the network",
    "langcell import-official": "needs the released checkpoint, which is not redistributed; "
                                "tests/models/test_serialization.py imports a release-format checkpoint, "
                                "through the command line too",
    "--model langcell_model/": "annotates with the model import-official writes (not run, above)",
}

# Literals of a block replaced before it runs: (block substring, old, new, reason). In a bash block the
# replacement is made in the commands that contain the block substring.
FEWSHOT_REASON = ("every shot setting and repeat tunes every few-shot method; one of each runs the same code "
                  "(the README's settings made this command alone six minutes on 2 cores)")
SUBSTITUTED = [
    ("--plot curves.png", "--plot curves.png", "--shots 1 --repeats 1 --plot curves.png", FEWSHOT_REASON),
    ("--shots 1,3,5,10 --repeats 3", "--shots 1,3,5,10 --repeats 3", "--shots 1 --repeats 1", FEWSHOT_REASON),
    ("--method wise --methods wise,linear", "--method wise", "--shots 1 --repeats 1 --method wise",
     FEWSHOT_REASON),
    ('from_config("small"', '"small"', '"tiny"',
     "tl.finetune of the small model took 23 minutes on the 2-core CPU; the tiny preset runs the same code"),
    ("evaluation.fewshot(", "shots=(1, 3, 5, 10), repeats=3", "shots=(1, 3), repeats=1",
     "12 tunings of every method are minutes even for the tiny model; 2 run the same code"),
    ("lca_margin=0.1)", "threshold=0.3", "threshold=0.0",
     "an untrained model's margins are near 0, so every call would be 'unknown' and calibration would "
     "have no call to score"),
]

# Files the blocks read, made by the fixture; a bash block's folder gets those whose name it mentions.
INPUTS = ("cells.h5ad", "more.h5ad", "query.h5ad", "labelled.h5ad", "atlas.h5ad", "data/", "run/model")


@dataclass
class Block:
    """One fenced code block of the README."""

    language: str
    line: int  # line of the opening fence, 1-based
    text: str

    def commands(self) -> list[str]:
        """The block's shell commands: each line joined with its backslash continuations."""
        joined = self.text.replace("\\\n", " ")
        return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block of ``text`` with its language and the line of its opening fence."""
    blocks, current = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        if current is None and line.startswith("```"):
            current = Block(line[3:].strip(), number, "")
        elif current is not None and line.startswith("```"):
            blocks.append(current)
            current = None
        elif current is not None:
            current.text += line + "\n"
    assert current is None, f"README.md: the block opened at line {current.line} is never closed"
    return blocks


BLOCKS = readme_blocks(README.read_text())


def skipped(command: str) -> str | None:
    """The NOT_RUN entry that matches ``command``, if any."""
    return next((key for key in NOT_RUN if key in command), None)


def test_the_tables_match_the_readme_and_every_block_has_a_known_language():
    assert len(BLOCKS) >= 16
    unknown = [(b.line, b.language) for b in BLOCKS if b.language not in ("bash", "python")]
    assert not unknown, f"README blocks this test cannot run (line, language): {unknown}"
    commands = [c for b in BLOCKS if b.language == "bash" for c in b.commands()]
    stale = [key for key in NOT_RUN if not any(key in c for c in commands)]
    assert not stale, f"NOT_RUN entries that match no README command: {stale}"
    for where, old, _, _ in SUBSTITUTED:
        assert sum(where in b.text and old in b.text for b in BLOCKS) == 1, where


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The files the README's commands read: pbmc68k's cells under the README's names, and a tiny model
    (LangCell.from_config, gene tokenizer fitted on those cells) where the README has a pretrained one."""
    root = tmp_path_factory.mktemp("inputs")
    adata = langcell.datasets.pbmc68k()
    # pbmc68k is one sample; `langcell evaluate --batch-key batch` needs a batch column, so the labelled
    # file gets two arbitrary halves (the scIB numbers mean nothing here, the command path is the point).
    # At most 15 cells per type: the few-shot and fine-tuning commands train on these, and on all 700
    # cells the README's fewshot command alone took six minutes on 2 cores.
    per_type = adata.obs.groupby("cell_type", observed=True).cumcount().to_numpy()
    labelled = adata[per_type < 15].copy()
    labelled.obs["batch"] = np.where(np.arange(labelled.n_obs) % 2 == 0, "a", "b")
    labelled.write_h5ad(root / "labelled.h5ad")
    small = adata[:120].copy()  # the annotate/embed inputs: fewer cells, the same code
    for name in ("cells.h5ad", "query.h5ad", "atlas.h5ad"):
        small.write_h5ad(root / name)
    adata[120:240].copy().write_h5ad(root / "more.h5ad")
    (root / "data").mkdir()
    adata[:60].copy().write_h5ad(root / "data" / "pbmc_1.h5ad")
    adata[60:120].copy().write_h5ad(root / "data" / "pbmc_2.h5ad")
    tokenizer = langcell.GeneTokenizer.fit(adata, progress=False)
    (root / "run").mkdir()
    langcell.LangCell.from_config("tiny", gene_tokenizer=tokenizer).save_pretrained(root / "run" / "model")
    return root


def source_path() -> str:
    """The ``src`` folder of the langcell this test imports: the CLI's processes must import it too."""
    return str(Path(langcell.__file__).resolve().parents[1])


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.language == "bash"], ids=lambda b: f"line{b.line}")
def test_bash_block_runs_as_written(block, inputs, tmp_path):
    lines = []
    for command in block.commands():
        key = skipped(command)
        for where, old, new, _ in SUBSTITUTED:
            if where in command:
                command = command.replace(old, new)
        lines.append(f": not run, {NOT_RUN[key]!r}" if key else command)
    if all(line.startswith(": not run") for line in lines):
        pytest.skip("every command is in NOT_RUN: " + "; ".join(sorted({skipped(c) for c in block.commands()})))
    for name in INPUTS:
        if re.search(rf"(^|\s){re.escape(name)}", block.text):
            target = tmp_path / name.rstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(inputs / name.rstrip("/"))
    script = tmp_path / "block.sh"
    script.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PYTHONPATH": source_path() + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", "-euo", "pipefail", str(script)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"README.md line {block.line}:\n{script.read_text()}\n{result.stderr[-4000:]}"


def test_python_blocks_run_as_written_in_one_namespace(tmp_path, monkeypatch):
    python = [b for b in BLOCKS if b.language == "python"]
    setup = [b for b in python if "import langcell" in b.text]
    assert len(setup) == 1, "one Python block (the API at a glance) imports langcell and defines the data"
    monkeypatch.chdir(tmp_path)  # the blocks write their plots into the working folder
    namespace: dict = {}
    for block in setup + [b for b in python if b is not setup[0]]:
        code = block.text
        for where, old, new, _ in SUBSTITUTED:
            if where in code:
                code = code.replace(old, new)
        start = time.perf_counter()
        exec(compile(code, f"README.md, block at line {block.line}", "exec"), namespace)
        print(f"README.md line {block.line}: {time.perf_counter() - start:.1f} s")
    assert {"adata", "model", "labels", "results", "report"} <= set(namespace)
    for plot in ("fewshot.png", "reliability.png", "explain.png"):
        assert (tmp_path / plot).is_file(), plot


def test_a_block_of_an_unknown_language_and_an_unclosed_block_are_found():
    blocks = readme_blocks("text\n```console\n$ ls\n```\n```python\nx = 1\ny = 2 \\\n  + 3\n```\n")
    assert [(b.language, b.line) for b in blocks] == [("console", 2), ("python", 5)]
    assert Block("bash", 1, "a \\\n  b\n# note\nc\n").commands() == ["a    b", "c"]
    with pytest.raises(AssertionError, match="never closed"):
        readme_blocks("```bash\nls\n")
