"""Pretraining on a tiny model and a small real corpus (CBMC cells with Cell Ontology terms)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from langcell.data.corpus import TokenCorpus, write_corpus
from langcell.data.tokenizer import GeneTokenizer
from langcell.errors import LangCellError
from langcell.models import LangCell
from langcell.train import PretrainConfig, load_recipe, pretrain
from langcell.train.data import CellTextTable, PretrainStream

SHARED = Path(__file__).resolve().parents[3] / "shared"
CBMC = SHARED / "data" / "cbmc_citeseq_500genes.h5ad"
pytestmark = [
    pytest.mark.skipif(not CBMC.is_file(), reason=f"{CBMC} is missing"),
    pytest.mark.slow,  # every test here writes a corpus and most train: the inner loop skips them
]


def cbmc_cells() -> ad.AnnData:
    """240 labelled CBMC cells, 20 per type where available (the corpus's cells, in its order)."""
    adata = ad.read_h5ad(CBMC)
    adata = adata[adata.obs["cell_type_ontology_term_id"] != "unknown"]
    rng = np.random.default_rng(0)
    keep = np.concatenate(
        [rng.permutation(np.flatnonzero(adata.obs["cell_type"] == t))[:20] for t in adata.obs["cell_type"].unique()]
    )
    return adata[np.sort(keep)].copy()


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """240 labelled CBMC cells, 20 per type where available, tokenized with a vocabulary of the data."""
    adata = cbmc_cells()
    tokenizer = GeneTokenizer.fit(adata, gene_id_kind="custom")
    out = tmp_path_factory.mktemp("corpus") / "cbmc"
    write_corpus([adata], tokenizer, out, max_length=128, progress=False)
    return out


def tiny(**changes) -> PretrainConfig:
    config = load_recipe("tiny")
    config.deterministic = True
    for key, value in changes.items():
        setattr(config, key, value)
    config.validate()
    return config


def read_log(run: Path) -> list[dict[str, str]]:
    with (run / "log.csv").open() as f:
        return list(csv.DictReader(f))


def test_text_table_covers_cells_and_groups_identical_texts(corpus_dir):
    corpus = TokenCorpus(corpus_dir)
    table = CellTextTable.from_obs(corpus.obs)
    # Reading only the term columns (what pretrain does) gives the same table.
    from_corpus = CellTextTable.from_corpus(TokenCorpus(corpus_dir))
    assert from_corpus.texts == table.texts and np.array_equal(from_corpus.text_ids, table.text_ids)
    assert table.aspects[0] == "cell_type"
    ids = table.text_ids[:, 0]
    assert (ids >= 0).all()
    # Same cell type <=> same text id (the C-T loss's positives).
    types = corpus.obs["cell_type_ontology_term_id"].astype(str).to_numpy()
    for t in np.unique(types):
        assert len(np.unique(ids[types == t])) == 1
    assert len(np.unique(ids)) == len(np.unique(types))
    assert all("cell type:" in table.texts[i] for i in np.unique(ids))


def test_stream_is_resumable_and_shards_ranks(corpus_dir):
    corpus = TokenCorpus(corpus_dir)
    cells = np.arange(len(corpus))
    stream = PretrainStream(corpus, cells, max_tokens=1024, max_batch_size=16, max_length=128, seed=3)
    n = stream.batches_per_epoch
    first = [b for _, b in zip(range(n + 3), stream.iterate(0), strict=False)]
    resumed = [b for _, b in zip(range(5), stream.iterate(n - 2), strict=False)]
    for a, b in zip(first[n - 2 :], resumed, strict=False):
        assert torch.equal(a["input_ids"], b["input_ids"])
    # Every cell once per epoch (but for a dropped last batch).
    seen = np.concatenate([b["cell_index"].numpy() for b in first[:n]])
    assert len(seen) == len(set(seen.tolist())) and len(seen) >= len(corpus) - 16
    # Two ranks split one epoch's batches without overlap.
    r0 = PretrainStream(corpus, cells, max_tokens=1024, max_batch_size=16, max_length=128, seed=3, rank=0, world_size=2)
    r1 = PretrainStream(corpus, cells, max_tokens=1024, max_batch_size=16, max_length=128, seed=3, rank=1, world_size=2)
    assert r0.batches_per_epoch == r1.batches_per_epoch
    a = np.concatenate([b["cell_index"].numpy() for _, b in zip(range(r0.batches_per_epoch), r0.iterate(), strict=False)])
    b = np.concatenate([b["cell_index"].numpy() for _, b in zip(range(r1.batches_per_epoch), r1.iterate(), strict=False)])
    assert not set(a.tolist()) & set(b.tolist())


def test_workers_serve_the_same_batches_and_shards_are_checked_once(corpus_dir):
    corpus = TokenCorpus(corpus_dir)
    table = CellTextTable.from_corpus(corpus)
    options = {"max_tokens": 1024, "max_batch_size": 16, "max_length": 128, "seed": 3, "table": table}
    cells = table.cells_with_cell_type_text()
    alone = [b for _, b in zip(range(6), PretrainStream(corpus, cells, **options).iterate(4), strict=False)]
    assert corpus._verified == {0}  # checked lazily, in this process, on the first read
    fresh = TokenCorpus(corpus_dir)
    with_workers = PretrainStream(fresh, cells, num_workers=2, **options)
    batches = [b for _, b in zip(range(6), with_workers.iterate(4), strict=False)]
    # Checked here, before the workers were forked: they inherit it instead of hashing the shards again.
    assert fresh._verified == set(range(len(fresh.manifest["shards"])))
    for a, b in zip(alone, batches, strict=True):
        for key in ("input_ids", "attention_mask", "cell_index", "text_ids"):
            assert torch.equal(a[key], b[key]), key


def test_every_loss_falls(corpus_dir, tmp_path):
    config = tiny(cell_steps=25, joint_steps=25, log_every=1, checkpoint_every=100, lr=2e-3, joint_lr=2e-3,
                  warmup_steps=2)
    pretrain(corpus_dir, tmp_path / "run", config, progress=False)
    rows = read_log(tmp_path / "run")
    for stage, names in (("cell", ["mgm_loss", "cc_loss"]), ("joint", ["mgm_loss", "cc_loss", "ct_loss", "ctm_loss"])):
        values = {n: [float(r[n]) for r in rows if r["stage"] == stage] for n in names}
        for name, series in values.items():
            assert all(np.isfinite(series)), (stage, name)
            assert np.mean(series[-5:]) < np.mean(series[:5]), (stage, name, series)
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(corpus_dir, tmp_path):
    config = tiny(cell_steps=3, joint_steps=3, checkpoint_every=2)
    pretrain(corpus_dir, tmp_path / "straight", config, progress=False)
    # Interrupted twice: inside the cell stage, and inside the joint stage.
    pretrain(corpus_dir, tmp_path / "resumed", config, progress=False, stop_after_steps=2)
    pretrain(corpus_dir, tmp_path / "resumed", config, progress=False, resume=True, stop_after_steps=2)
    pretrain(corpus_dir, tmp_path / "resumed", config, progress=False, resume=True)
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The log of the resumed run holds every step once.
    steps = [(r["stage"], int(r["step"])) for r in read_log(tmp_path / "resumed")]
    assert steps == [("cell", 1), ("cell", 2), ("cell", 3), ("joint", 1), ("joint", 2), ("joint", 3)]



def test_log_has_one_clock_for_both_stages_and_across_a_resume(corpus_dir, tmp_path):
    """elapsed_s never goes back: not at the joint stage, not after a resume; every row names its stage."""
    import time

    config = tiny(cell_steps=2, joint_steps=2, log_every=1, checkpoint_every=1)
    run = tmp_path / "run"
    wall = time.perf_counter()
    pretrain(corpus_dir, run, config, progress=False, stop_after_steps=3)  # stops inside the joint stage
    before = read_log(run)
    pretrain(corpus_dir, run, config, progress=False, resume=True)
    wall = time.perf_counter() - wall
    rows = read_log(run)
    assert [(r["stage"], int(r["step"])) for r in rows] == [("cell", 1), ("cell", 2), ("joint", 1), ("joint", 2)]
    assert rows[: len(before)] == before
    elapsed = [float(r["elapsed_s"]) for r in rows]
    assert all(b > a for a, b in zip(elapsed, elapsed[1:], strict=False)), elapsed
    # The run's clock counts only time inside the two calls.
    assert 0 < elapsed[-1] <= wall

def test_cell_stage_leaves_the_text_tower_untouched(corpus_dir, tmp_path):
    config = tiny(stage="cell", cell_steps=2)
    model = pretrain(corpus_dir, tmp_path / "run", config, progress=False)
    torch.manual_seed(config.seed)
    from langcell.models.langcell import LangCell

    fresh_config = config.model_config()
    fresh_config.cell.vocab_size = model.config.cell.vocab_size
    fresh = LangCell.from_config(fresh_config)
    for (name, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        if name.startswith(("text_encoder.", "text_proj.", "ctm_head.", "logit_scale")):
            assert torch.equal(p, q), name


def test_the_optimiser_steps_on_one_thread_on_the_cpu(corpus_dir, tmp_path, monkeypatch):
    # The remedy for the rare second outcome under load (MODEL_CARD); the thread count comes back after.
    seen = []
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pretrain(corpus_dir, tmp_path / "run", tiny(stage="cell", cell_steps=2), progress=False)
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_freeze_text_trains_only_cross_attention_of_the_text_tower(corpus_dir, tmp_path):
    config = tiny(stage="joint", joint_steps=2, freeze_text=True)
    before = {}
    from langcell.train import pretrain as run

    model = run(corpus_dir, tmp_path / "a", config, progress=False)
    torch.manual_seed(config.seed)
    from langcell.models.langcell import LangCell

    fresh_config = config.model_config()
    fresh_config.cell.vocab_size = model.config.cell.vocab_size
    before = dict(LangCell.from_config(fresh_config).named_parameters())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(".crossattention." in n for n in changed)
    assert not [n for n in changed if n.startswith("text_encoder.") and ".crossattention." not in n]
    assert any(n.startswith("text_proj.") for n in changed)


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(corpus_dir, tmp_path):
    config = tiny(stage="cell", cell_steps=4, checkpoint_every=1)
    pretrain(corpus_dir, tmp_path / "run", config, progress=False, stop_after_steps=1)
    latest = json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())
    broken = tiny(stage="cell", cell_steps=4, checkpoint_every=1)
    broken.loss_weights = {"mgm": float("inf"), "cc": 1.0, "ct": 1.0, "ctm": 1.0}
    with pytest.raises(LangCellError, match="non-finite.*cell-0000001"):
        pretrain(corpus_dir, tmp_path / "run", broken, progress=False, resume=True)
    assert json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text()) == latest


def test_run_directory_errors(corpus_dir, tmp_path):
    config = tiny(stage="cell", cell_steps=1)
    with pytest.raises(LangCellError, match="nothing to resume"):
        pretrain(corpus_dir, tmp_path / "empty", config, progress=False, resume=True)
    pretrain(corpus_dir, tmp_path / "run", config, progress=False)
    with pytest.raises(LangCellError, match="already holds a run"):
        pretrain(corpus_dir, tmp_path / "run", config, progress=False)
    with pytest.raises(LangCellError, match="does not exist"):
        pretrain(corpus_dir, tmp_path / "no" / "such" / "dir", config, progress=False)


def test_recipes_load_and_bad_recipes_are_refused(tmp_path):
    for name in ("tiny", "small", "base"):
        assert isinstance(load_recipe(name), PretrainConfig)
    with pytest.raises(LangCellError, match="no pretraining recipe"):
        load_recipe("enormous")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": "tiny", "learning_rate": 1}))
    with pytest.raises(LangCellError, match="learning_rate"):
        load_recipe(bad)
    bad.write_text("{not json")
    with pytest.raises(LangCellError, match="not valid JSON"):
        load_recipe(bad)
    bad.write_text(json.dumps({"model": "tiny", "stage": "everything"}))
    with pytest.raises(LangCellError, match="stage"):
        load_recipe(bad)


def test_two_process_gloo_run_with_torchrun(corpus_dir, tmp_path):
    env = dict(os.environ, GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"), OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "langcell", "pretrain", "--config", "tiny", "--corpus", str(corpus_dir),
        "--out", str(tmp_path / "ddp"), "--max-steps", "2", "--device", "cpu", "--quiet",
        "--eval-every", "2", "--eval-cells", "20", "--tensorboard",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_log(tmp_path / "ddp")
    assert [(r["stage"], r["step"]) for r in rows] == [("cell", "1"), ("cell", "2"), ("joint", "1"), ("joint", "2")]
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    # The held-out evaluation runs on rank 0 alone (the others wait for it) and lands in the one log.
    assert [r["eval_accuracy"] != "" for r in rows] == [False, True, False, True]
    assert all(0 <= float(r["eval_macro_f1"]) <= 1 for r in rows if r["eval_macro_f1"])
    assert len(list((tmp_path / "ddp" / "tensorboard").iterdir())) == 1  # one event file: rank 0's
    state = torch.load(
        tmp_path / "ddp" / "checkpoints" / "joint-0000002" / "training_state.pt", weights_only=True
    )
    assert state["world_size"] == 2
    assert (tmp_path / "ddp" / "model" / "model.safetensors").is_file()


def test_the_model_gets_only_the_positions_its_recipe_trains(corpus_dir):
    tokenizer = TokenCorpus(corpus_dir).tokenizer
    demo = load_recipe("demo")  # small preset (2,048 positions), cells cut to 128 tokens
    assert demo.model_config().cell.max_position_embeddings == 2048
    config = demo.model_config_for(tokenizer)
    assert config.cell.max_position_embeddings == demo.max_length == 128
    assert config.cell.vocab_size == tokenizer.vocab_size
    base = load_recipe("base")  # trains every position of its encoder
    assert base.model_config_for(tokenizer).cell.max_position_embeddings == base.max_length == 2048


def test_resume_refuses_a_pointer_outside_the_run_a_damaged_state_and_another_seed(corpus_dir, tmp_path):
    import json

    config = tiny(stage="cell", cell_steps=3, checkpoint_every=1)
    run = tmp_path / "run"
    pretrain(corpus_dir, run, config, progress=False, stop_after_steps=1)
    pointer = run / "checkpoints" / "latest.json"
    good = pointer.read_text()
    # Another seed would mix two random streams.
    with pytest.raises(LangCellError, match="seed 0 but this call has seed 7"):
        pretrain(corpus_dir, run, tiny(stage="cell", cell_steps=3, checkpoint_every=1, seed=7), progress=False,
                 resume=True)
    # A pointer that leaves the run directory, or is not JSON.
    for damaged, message in ((json.dumps({"checkpoint": "../../elsewhere"}), "not a checkpoint of this run"),
                             ("{not json", "is damaged")):
        pointer.write_text(damaged)
        with pytest.raises(LangCellError, match=message):
            pretrain(corpus_dir, run, config, progress=False, resume=True)
    pointer.write_text(good)
    # A training state without its optimiser.
    name = json.loads(good)["checkpoint"]
    state_file = run / "checkpoints" / name / "training_state.pt"
    state = torch.load(state_file, weights_only=True)
    del state["optimizer"]
    torch.save(state, state_file)
    with pytest.raises(LangCellError, match="lacks optimizer"):
        pretrain(corpus_dir, run, config, progress=False, resume=True)


def test_held_out_evaluation_is_logged_matches_annotate_and_is_never_trained_on(corpus_dir, tmp_path, monkeypatch):
    from sklearn.metrics import accuracy_score, f1_score

    from langcell import tl
    from langcell.models.langcell import LangCell
    from langcell.ontology import describe_cells
    from langcell.train.heldout import held_out_cells

    pretrain_module = sys.modules["langcell.train.pretrain"]  # the module (langcell.train.pretrain is the function)

    # A spy on the batch stream (the real one runs): every cell index the trainer is given.
    trained: list[np.ndarray] = []

    class RecordingStream(pretrain_module.PretrainStream):
        def iterate(self, start=0):
            for batch in super().iterate(start):
                trained.append(batch["cell_index"].numpy().copy())
                yield batch

    monkeypatch.setattr(pretrain_module, "PretrainStream", RecordingStream)
    config = tiny(cell_steps=2, joint_steps=4, eval_every=2, eval_cells=40, log_every=3, tensorboard=True)
    pretrain(corpus_dir, tmp_path / "run", config, progress=False)
    rows = read_log(tmp_path / "run")
    evaluated = [r for r in rows if r["eval_accuracy"] != ""]
    # Every 2 steps, and at each stage's end, in rows of their own where they are no logging step.
    assert [(r["stage"], r["step"]) for r in evaluated] == [("cell", "2"), ("joint", "2"), ("joint", "4")]
    assert [(r["stage"], r["step"]) for r in rows] == [("cell", "2"), ("joint", "2"), ("joint", "3"), ("joint", "4")]
    for r in evaluated:
        assert 0 <= float(r["eval_accuracy"]) <= 1 and 0 <= float(r["eval_macro_f1"]) <= 1
        assert np.isfinite(float(r["loss"]))

    # The held-out cells: 40 labelled cells, the same draw as the run's, never in a training batch.
    corpus = TokenCorpus(corpus_dir)
    held = held_out_cells(CellTextTable.from_obs(corpus.obs), 40, config.seed)
    assert held.size == 40 and len(np.unique(held)) == 40
    seen = np.unique(np.concatenate(trained))
    assert seen.size >= 50 and not set(held.tolist()) & set(seen.tolist())

    # The last evaluation (joint step 4, the final model) equals annotating the held-out cells with
    # tl.annotate against every cell-type text of the corpus, scored with scikit-learn.
    adata = cbmc_cells()
    texts = describe_cells(adata.obs, ["cell_type"])["cell_type"].astype(str).to_numpy()
    classes = {text: text for text in sorted(set(texts))}
    cells = adata[held].copy()
    tl.annotate(cells, LangCell.from_pretrained(tmp_path / "run" / "model"), classes, progress=False)
    predicted = cells.obs["langcell_cell_type"].astype(str).to_numpy()
    assert float(evaluated[-1]["eval_accuracy"]) == pytest.approx(accuracy_score(texts[held], predicted), abs=1e-9)
    assert float(evaluated[-1]["eval_macro_f1"]) == pytest.approx(
        f1_score(texts[held], predicted, average="macro", zero_division=0), abs=1e-9
    )

    # TensorBoard event files with the same numbers.
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"loss", "eval_accuracy", "eval_macro_f1"} <= set(events.Tags()["scalars"])
    accuracy = events.Scalars("eval_accuracy")
    assert [e.step for e in accuracy] == [2, 4, 6]  # steps counted over both stages
    assert accuracy[-1].value == pytest.approx(float(evaluated[-1]["eval_accuracy"]), abs=1e-6)


def test_held_out_evaluation_settings_are_checked_before_any_work(corpus_dir, tmp_path):
    with pytest.raises(LangCellError, match=r"eval_cells=10000 but the corpus has only \d+ cells with a cell-type text"):
        pretrain(corpus_dir, tmp_path / "run", tiny(eval_every=2, eval_cells=10_000), progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(LangCellError, match="eval_every must be >= 0"):
        tiny(eval_every=-1)
    # Resuming with other held-out cells would change the training data.
    pretrain(corpus_dir, tmp_path / "run", tiny(stage="cell", cell_steps=2, eval_every=1, eval_cells=20),
             progress=False, stop_after_steps=1)
    with pytest.raises(LangCellError, match="eval_cells=20 but this call has eval_every=1, eval_cells=30"):
        pretrain(corpus_dir, tmp_path / "run", tiny(stage="cell", cell_steps=2, eval_every=1, eval_cells=30),
                 progress=False, resume=True)


def test_bf16_pretraining_evaluates_held_out_cells_and_keeps_fp32_weights(corpus_dir, tmp_path):
    # The held-out evaluation runs inside the training loop at the recipe's precision; on a CPU, bf16
    # inference holds the weights in bf16 for the evaluation only (langcell.precision.inference_precision).
    pretrain(corpus_dir, tmp_path / "run", tiny(stage="cell", cell_steps=2, eval_every=1, eval_cells=20,
                                               precision="bf16"), progress=False)
    evaluated = [r for r in read_log(tmp_path / "run") if r["eval_accuracy"] != ""]
    assert [r["step"] for r in evaluated] == ["1", "2"]
    model = LangCell.from_pretrained(tmp_path / "run" / "model")
    weights = dict(model.named_parameters())
    assert all(w.dtype == torch.float32 and bool(torch.isfinite(w).all()) for w in weights.values())
