"""Training under torchrun + DeepSpeed (ZeRO-2/3, 2 CPU ranks), kill-and-resume (also at another world size), MLflow
records, bad settings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from pipelines.cli import main
from pipelines.data.synthetic import write_synthetic_lerobot
from pipelines.lineage import data_version

REPO = Path(__file__).resolve().parents[3]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}


def cli(*args: str, nproc: int = 1, timeout: int = 400) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   "--nproc_per_node", str(nproc)]
    proc = subprocess.run([*launcher, "-m", "pipelines.cli", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_synthetic_lerobot(root / "episodes", episodes=4)
    cli("data", "prepare", "--episodes-dir", str(root / "episodes"), "--out", str(root / "prepared"),
        "--feast-dir", str(root / "feast"), "--preset", "tiny")
    cli("data", "encode", "--episodes-dir", str(root / "episodes"), "--prepared-dir", str(root / "prepared"),
        "--feast-dir", str(root / "feast"), "--out", str(root / "latents"), "--preset", "tiny")
    return root


def train_args(data: Path, run: str, *extra: str) -> list[str]:
    return ["train", "pretrain", "--preset", "tiny", "--data-dir", str(data), "--run-dir", str(data / "runs" / run),
            "--token-budget", "600", "--lr", "3e-3", "--warmup-steps", "1", "--val-every", "3",
            "--tracking-uri", f"sqlite:///{data}/mlflow.db", *extra]


def metric_history(data: Path, run_id: str, key: str) -> list[float]:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{data}/mlflow.db")
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.mark.parametrize("zero", [2, 3], ids=["zero2", "zero3"])
def test_two_ranks_train_with_falling_loss_and_identical_parameters(data, zero):
    run = f"zero{zero}"
    cli(*train_args(data, run, "--steps", "8", "--zero-stage", str(zero), "--snapshot-every", "4", "--no-register",
                    "--save-raw"), nproc=2)
    out = data / "runs" / run
    digests = {p.read_text() for p in out.glob("param_digest.rank*.txt")}
    assert len(list(out.glob("param_digest.rank*.txt"))) == 2 and len(digests) == 1
    run_id = json.loads((out / "summary.json").read_text())["mlflow_run_id"]
    losses = metric_history(data, run_id, "loss")
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    model_dir = out / "model"
    assert (model_dir / "config.json").is_file()
    # self-contained: the VAE the latents came from and the instruction embeddings travel with the weights
    from safetensors.torch import load_file

    from model.encoders import VideoVAE

    assert VideoVAE.from_pretrained(model_dir / "vae").latent_channels == 16
    text = load_file(str(model_dir / "text_embeddings.safetensors"))
    assert text and all(t.shape[-1] == 32 for t in text.values())
    observation = json.loads((model_dir / "config.json").read_text())["action_space"]["observation"]
    assert observation["latent_hw"] and observation["cameras"]
    # --snapshot-every: a complete model directory at step 4 (learning curves), distinct from the final one
    # --save-raw: the last trained weights beside the saved weight average (ZeRO-3 gathers the averaged shards)
    snapshots = sorted(p.name for p in (out / "snapshots").iterdir())
    assert snapshots == ["raw", "step0000004"]
    from model.lingbot_va import LingBotVA

    early, final, raw = (LingBotVA.from_pretrained(d) for d in (out / "snapshots" / "step0000004", model_dir,
                                                                out / "snapshots" / "raw"))
    assert (out / "snapshots" / "step0000004" / "vae").is_dir()
    assert any(not torch.equal(a, b) for a, b in zip(early.parameters(), final.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(raw.parameters(), final.parameters(), strict=True))


def test_kill_and_resume_continues_the_same_run(data):
    cli(*train_args(data, "straight", "--steps", "6", "--no-register"))
    # a restartable pod's first attempt: --resume-if-present with nothing to resume starts from step 0
    cli(*train_args(data, "resumed", "--steps", "6", "--max-steps-this-run", "3", "--no-register"), "--resume-if-present")
    stopped = json.loads((data / "runs" / "resumed" / "summary.json").read_text())
    assert stopped["step"] == 3 and not stopped["finished"]
    cli(*train_args(data, "resumed", "--steps", "6", "--no-register"), "--resume")
    resumed = json.loads((data / "runs" / "resumed" / "summary.json").read_text())
    straight = json.loads((data / "runs" / "straight" / "summary.json").read_text())
    assert resumed["step"] == 6 and resumed["finished"]
    assert resumed["mlflow_run_id"] == stopped["mlflow_run_id"]
    assert metric_history(data, resumed["mlflow_run_id"], "loss") == pytest.approx(
        metric_history(data, straight["mlflow_run_id"], "loss"), rel=1e-5)
    # the weight average was saved with the checkpoint and continued: the same model as the uninterrupted run
    from model.lingbot_va import LingBotVA

    a, b = (LingBotVA.from_pretrained(data / "runs" / r / "model").state_dict() for r in ("straight", "resumed"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    assert (data / "runs" / "resumed" / "checkpoints" / "step0000003" / "ema.pt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(("zero", "before", "after"), [(3, 2, 1), (2, 1, 2)], ids=["zero3-2to1", "zero2-1to2"])
def test_resume_at_another_world_size_continues_the_loss(data, zero, before, after):
    """An elastic restart at another node count: ``before`` ranks save at step 3, ``after`` ranks resume (through
    DeepSpeed's universal checkpoint). With 2 // ranks micro-batches per rank and step the global batch stays 2, and
    the data stream is indexed by the run's micro-batch count, so the resumed steps must reproduce the uninterrupted
    run."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from model.lingbot_va import LingBotVA

    def run(name: str, ranks: int, *extra: str) -> None:
        # --ema-decay 0: the model directory is the trained weights, so it can be compared with the checkpoint's
        cli(*train_args(data, name, "--zero-stage", str(zero), "--checkpoint-every", "3", "--no-register",
                        "--grad-accum", str(2 // ranks), "--ema-decay", "0", *extra), "--resume-if-present", nproc=ranks)

    straight, elastic = f"ws-straight-{zero}-{before}", f"ws-elastic-{zero}-{before}to{after}"
    run(straight, before, "--steps", "6")
    run(elastic, before, "--steps", "6", "--max-steps-this-run", "3")
    out = data / "runs" / elastic
    saved = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step0000003")
    # resumed with nothing left to train (--steps 3): the model it writes right after the load is the saved one
    run(elastic, after, "--steps", "3")
    assert (out / "checkpoints" / "universal" / "step0000003" / "zero").is_dir()
    loaded = LingBotVA.from_pretrained(out / "model").state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    # resumed again (reusing the conversion) through step 6
    run(elastic, after, "--steps", "6")
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["step"] == 6 and resumed["finished"]
    assert not (out / "checkpoints" / "universal").exists()  # superseded by the checkpoint saved at step 6
    losses = metric_history(data, resumed["mlflow_run_id"], "loss")
    reference = metric_history(data, json.loads((data / "runs" / straight / "summary.json").read_text())["mlflow_run_id"],
                               "loss")
    assert len(losses) == 6 and losses[:3] == pytest.approx(reference[:3], rel=1e-6)
    # steps 4-6: the same batches, noise, weights and Adam moments; only the order of the gradient sums differs
    # (a wrong batch or a lost optimizer state moves the loss by far more than 1e-6)
    assert losses[3:] == pytest.approx(reference[3:], rel=1e-6)
    final = LingBotVA.from_pretrained(out / "model").state_dict()
    expected = LingBotVA.from_pretrained(data / "runs" / straight / "model").state_dict()
    assert all(torch.allclose(final[k], expected[k], rtol=1e-5, atol=1e-7) for k in expected)
    # Adam as saved at step 6: each parameter group counted its own 6 steps and kept its weight decay (the settings'
    # 0.01, none on norms and biases)
    optim = torch.load(out / "checkpoints" / "step0000006" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                       weights_only=False)["optimizer_state_dict"]
    adam = optim["optimizer_state_dict" if zero == 3 else "base_optimizer_state"]
    assert [float(state["step"]) for state in adam["state"].values()] == [6.0, 6.0]
    assert [group["weight_decay"] for group in adam["param_groups"]] == [0.01, 0.0]


@pytest.mark.parametrize(
    ("saved_by", "resume", "world", "expected"),
    [
        pytest.param(None, "auto", 2, None, id="auto-nothing-to-resume"),
        pytest.param(2, False, 2, None, id="no-resume"),
        pytest.param(2, True, 2, ("checkpoints", False), id="same-world-size"),
        pytest.param(0, "auto", 4, ("checkpoints", False), id="no-zero-partitions"),
    ],
)
def test_resume_point_reads_the_native_checkpoint_unless_the_world_size_changed(tmp_path, saved_by, resume, world,
                                                                                  expected):
    from pipelines.train.checkpoint import resume_point

    ckpt = tmp_path / "checkpoints"
    if saved_by is not None:
        (ckpt / "step0000003").mkdir(parents=True)
        (ckpt / "latest").write_text("step0000003")
        for rank in range(saved_by):
            (ckpt / "step0000003" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").touch()
    point = resume_point(ckpt, resume, world, rank=0)
    assert point == (None if expected is None else (tmp_path / expected[0], expected[1]))


def test_resume_without_a_checkpoint_fails(tmp_path):
    from pipelines.train.checkpoint import resume_point

    with pytest.raises(ValueError, match="no checkpoint under"):
        resume_point(tmp_path / "checkpoints", True, 1, rank=0)


def test_mlflow_run_holds_params_metrics_artifacts_and_registered_model(data):
    cli(*train_args(data, "tracked", "--steps", "3"))
    summary = json.loads((data / "runs" / "tracked" / "summary.json").read_text())
    mlflow.set_tracking_uri(f"sqlite:///{data}/mlflow.db")
    try:
        run = mlflow.get_run(summary["mlflow_run_id"])
        assert run.data.params["preset"] == "tiny" and run.data.params["settings.zero_stage"] == "2"
        assert "data_version" in run.data.params and "deepspeed.zero_optimization.stage" in run.data.params
        for key in ("L_dyn", "L_inv", "L_fdm", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "val_loss"):
            assert key in run.data.metrics, key
        client = mlflow.MlflowClient()
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config", "validation"} <= artifacts
        assert client.list_artifacts(run.info.run_id, "validation")[0].path.endswith(".png")
        version = client.get_model_version_by_alias("lingbot-va-base", "challenger")
        model = mlflow.pyfunc.load_model("models:/lingbot-va-base@challenger")
        # the input example is a recorded observation: the first frames of a training episode
        example = model.input_example
        assert example["images"].dtype == np.uint8 and example["images"].std() > 0
        out = model.predict(example)
        assert int(version.version) >= 1 and out["actions"].shape[0] == 1 and np.isfinite(out["actions"]).all()
        # lineage: the folders the run read, as dataset inputs whose digests are their DVC hashes
        inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
        assert sorted(inputs) == ["episodes", "latents", "prepared"]
        for name, entry in inputs.items():
            expected = data_version(data / name)
            assert entry.dataset.digest == expected.md5 and expected.md5.endswith(".dir")
            assert {t.key: t.value for t in entry.tags}["mlflow.data.context"] == "training"
            assert run.data.params[f"data.{name}"] == run.data.tags[f"dvc.{name}"] == expected.md5
        assert run.data.params["data_version"] == inputs["latents"].dataset.digest
        assert model.metadata.metadata["data"]["latents"] == inputs["latents"].dataset.digest
        # the pipeline's runs share a parent, keyed by the latents' hash
        parent = mlflow.get_run(run.data.tags["mlflow.parentRunId"])
        assert parent.data.tags["pipeline.data_version"] == inputs["latents"].dataset.digest
        # DVC's loss plot and the evaluate stage's input, in the run dir
        loss = (data / "runs" / "tracked" / "loss.csv").read_text().splitlines()
        assert loss[0].startswith("step,loss,") and [r.split(",")[0] for r in loss[1:]] == ["1", "2", "3"]
        registered = json.loads((data / "runs" / "tracked" / "registered.json").read_text())
        assert registered["model_uri"] == f"models:/lingbot-va-base/{version.version}"
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["train", "pretrain", "--lr", "0"], "lr must be > 0", id="lr-zero"),
        pytest.param(["train", "pretrain", "--data-dir", "/nonexistent"], "missing data", id="missing-data"),
        pytest.param(["train", "posttrain", "--init-from", "x"], "needs --task", id="posttrain-no-task"),
        pytest.param(["train", "pretrain", "--preset", "tiny", "--exclude-tasks", "task-a,task-b", "--data-dir", "DATA"],
                     "no task left to train on", id="every-task-excluded"),
    ],
)
def test_bad_settings_fail_fast(argv, message, capsys, request):
    if "DATA" in argv:
        argv = [str(request.getfixturevalue("data")) if a == "DATA" else a for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_pretraining_leaves_excluded_tasks_out(data):
    """A held-out-task pretraining never sees the excluded task: not in its data, its tasks or its text embeddings."""
    from safetensors.torch import load_file

    cli(*train_args(data, "heldout", "--steps", "2", "--exclude-tasks", "task-b", "--no-register"))
    model = data / "runs" / "heldout" / "model"
    assert json.loads((model / "config.json").read_text())["action_space"]["tasks"] == ["task-a"]
    assert set(load_file(str(model / "text_embeddings.safetensors"))) == {"task-a"}
    with pytest.raises(SystemExit):  # post-training trains on one task: the flag is not offered there
        main(["train", "posttrain", "--task", "task-b", "--init-from", str(model), "--exclude-tasks", "task-a"])


def test_unknown_stage_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["train", "finetune"])
    assert "invalid choice: 'finetune'" in capsys.readouterr().err


def test_reactive_baseline_trains_through_validation(data):
    """The baseline predicts no video: validation (and its real-vs-predicted strip) must still work."""
    cli(*train_args(data, "reactive", "--steps", "3", "--objective", "reactive", "--no-register"))
    summary = json.loads((data / "runs" / "reactive" / "summary.json").read_text())
    assert summary["finished"] and summary["L_dyn"] == 0.0 and summary["val_loss"] > 0


def test_deepspeed_ops_build_inside_the_repo_cache(monkeypatch):
    """init_distributed JIT-builds DeepSpeed's CPU comm op before the engine exists: it must not land in ~/.cache."""
    from pipelines.train import trainer

    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"})
    seen = {}
    monkeypatch.setattr("deepspeed.init_distributed", lambda **kw: seen.setdefault("dir", os.environ["TORCH_EXTENSIONS_DIR"]))
    monkeypatch.setattr(trainer.dist, "is_initialized", lambda: False)
    trainer._init_distributed()
    assert Path(seen["dir"]) == REPO / ".cache" / "torch_extensions"


def test_stale_ops_build_lock_is_removed_and_a_live_one_kept(tmp_path, monkeypatch):
    """A killed op build leaves a lock torch would wait on forever; only an old one is removed."""
    from pipelines.train.parallelize import STALE_BUILD_LOCK_S, use_repo_ops_cache

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, live = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "other_op" / "lock"
    for lock in (stale, live):
        lock.parent.mkdir()
        lock.touch()
    old = os.stat(stale).st_mtime - STALE_BUILD_LOCK_S - 60
    os.utime(stale, (old, old))
    use_repo_ops_cache()
    assert not stale.exists() and live.exists()
