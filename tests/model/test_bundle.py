"""The policy bundle: one save/load of a model directory (bundle version 1), refusal of other shapes with the version
named, the policy built on it, and the model package's import boundary."""

from __future__ import annotations

import ast
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model import LingBotVA, get_preset
from model.bundle import BUNDLE_VERSION, TEXT_FILE, VAE_DIR, ActionSpace, PolicyBundle, read_normalization
from model.normalization import ActionNormalizer, EmbodimentNorm
from model.policy import ChunkPolicy
from pipelines.data.embodiments import get_adapter
from pipelines.data.features import load_snapshot

sys.path.insert(0, str(Path(__file__).parents[1] / "pipelines" / "evaluate"))
from model_dirs import TASK, load_policy, write_model_dir  # the self-contained tiny bundles the other tests use

MODEL = Path(__file__).resolve().parents[2] / "model"


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("bundle") / "model")


def _norm(name: str, offset: float = 0.0) -> EmbodimentNorm:
    q01 = offset + np.arange(30, dtype=np.float32)
    mask = np.zeros(30, bool)
    mask[:7] = True
    return EmbodimentNorm.from_normalizer(name, ActionNormalizer(q01, q01 + 5.0), mask)


def _rewrite(src: Path, dst: Path, **changes) -> Path:
    """A copy of bundle ``src`` with config.json entries replaced (None removes one)."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        meta.pop(key) if value is None else meta.__setitem__(key, value)
    (dst / "config.json").write_text(json.dumps(meta))
    return dst


def test_load_then_save_writes_the_same_directory(bundle_dir, tmp_path):
    """A loaded bundle saves back to the same config.json byte for byte, with the same weights, VAE and text."""
    bundle = PolicyBundle.load(bundle_dir)
    assert bundle.embodiment == "metaworld-sawyer" and bundle.tasks == [TASK]
    assert bundle.action_space.cameras == ("corner4_zoom", "gripperPOV") and bundle.image_size == 32
    again = bundle.save(tmp_path / "again")
    assert (again / "config.json").read_bytes() == (bundle_dir / "config.json").read_bytes()
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in bundle_dir.iterdir())
    reloaded = PolicyBundle.load(again)
    for a, b in zip(bundle.model.state_dict().values(), reloaded.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(bundle.text[TASK], reloaded.text[TASK])
    assert torch.equal(bundle.vae.latents_std, reloaded.vae.latents_std)
    norm = reloaded.normalization["metaworld-sawyer"]
    assert norm.normalizer.q99.dtype == np.float32 and norm.action_mask.dtype == bool


def test_a_normalisation_without_a_feature_store_is_a_feature_snapshot():
    """``from_normalizer`` writes the feature store's snapshot format: the feature store's reader takes it."""
    norm = _norm("franka")
    restored = load_snapshot(json.loads(json.dumps(norm.snapshot)))
    assert np.array_equal(restored["norm_stats"]["action_q99"], norm.normalizer.q99)
    assert np.array_equal(restored["embodiment"]["action_mask"], norm.action_mask)


def test_several_embodiments_are_read_by_name():
    stored = {"embodiments": {"franka": _norm("franka").snapshot, "aloha": _norm("aloha", 10.0).snapshot}}
    norms = read_normalization(json.loads(json.dumps(stored)))
    assert sorted(norms) == ["aloha", "franka"]
    np.testing.assert_array_equal(norms["aloha"].normalizer.q01, 10.0 + np.arange(30, dtype=np.float32))
    with pytest.raises(ValueError, match="do not name their snapshots"):
        read_normalization({"embodiments": {"aloha": _norm("franka").snapshot}})


OLD_ACTION = ActionNormalizer(np.zeros(30), np.ones(30)).to_dict()


@pytest.mark.parametrize("norm", [
    pytest.param({"action": OLD_ACTION}, id="normalizer-under-action"),
    pytest.param(OLD_ACTION, id="bare-normalizer"),
    pytest.param({"embodiments": {"franka": {"action": OLD_ACTION}}}, id="embodiments-of-normalizers"),
    pytest.param(None, id="none"),
])
def test_older_normalisation_shapes_are_refused_naming_the_bundle_version(bundle_dir, tmp_path, norm):
    bad = _rewrite(bundle_dir, tmp_path / "old", normalization=norm)
    with pytest.raises(ValueError, match=rf"bundle version {BUNDLE_VERSION}.*normalization"):
        PolicyBundle.load(bad)


@pytest.mark.parametrize(("change", "match"), [
    pytest.param({"action_space": {"embodiments": ["metaworld-sawyer"], "tasks": [TASK], "tau": 4}},
                 r"action_space lacks \['instructions', 'observation'\]", id="no-observation"),
    pytest.param({"action_space": {"embodiments": ["metaworld-sawyer"], "tasks": [TASK], "tau": 4, "instructions": {},
                                   "observation": {"cameras": [], "latent_hw": [2, 4]}}},
                 "names no camera", id="no-camera"),
    pytest.param({"action_space": {"embodiments": ["franka"], "tasks": [TASK], "tau": 4, "instructions": {},
                                   "observation": {"cameras": ["c"], "latent_hw": [2, 4]}}},
                 r"normalisation covers embodiments \['metaworld-sawyer'\], the action space \['franka'\]",
                 id="stats-of-another-embodiment"),
    pytest.param({"format_version": 0}, "format_version 0; this code reads bundle version 1", id="version-0"),
])
def test_malformed_directories_are_refused(bundle_dir, tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        PolicyBundle.load(_rewrite(bundle_dir, tmp_path / "bad", **change))


@pytest.mark.parametrize("part", [VAE_DIR, TEXT_FILE])
def test_a_directory_without_its_encoders_is_not_a_bundle(bundle_dir, tmp_path, part):
    bad = tmp_path / "bad"
    shutil.copytree(bundle_dir, bad)
    (shutil.rmtree if (bad / part).is_dir() else Path.unlink)(bad / part)
    with pytest.raises(ValueError, match=rf"not a policy bundle \(version {BUNDLE_VERSION}\): it has no"):
        PolicyBundle.load(bad)
    LingBotVA(get_preset("tiny")).save_pretrained(tmp_path / "network")  # the network alone is no bundle either
    with pytest.raises(ValueError, match="holds the network alone"):
        PolicyBundle.load(tmp_path / "network")


def test_a_policy_drives_the_one_embodiment_of_its_bundle(bundle_dir):
    bundle = PolicyBundle.load(bundle_dir)
    other = type("Other", (), {"name": "franka", "spec": None})()
    with pytest.raises(ValueError, match="adapter 'franka' given for a bundle of embodiment 'metaworld-sawyer'"):
        ChunkPolicy(bundle, other)
    space = ActionSpace(embodiments=("aloha", "franka"), tasks=(TASK,), tau=4, instructions={},
                        cameras=("c",), latent_hw=(2, 4))
    two = PolicyBundle(model=bundle.model, vae=bundle.vae, text=bundle.text, action_space=space,
                       normalization={"aloha": _norm("aloha"), "franka": _norm("franka")})
    with pytest.raises(ValueError, match=r"covers embodiments \['aloha', 'franka'\]; a closed-loop policy needs"):
        ChunkPolicy(two, get_adapter("metaworld-sawyer"))


def test_first_chunks_equal_one_episode_per_robot(bundle_dir):
    """The pyfunc's batched first chunk is each robot's own episode: plan, then native commands at its state."""
    policy = load_policy(bundle_dir)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 2, 32, 32, 3), dtype=np.uint8)
    states = np.array([[0.0, 0.6, 0.2, 0.5], [0.1, 0.5, 0.1, 0.0]], np.float32)
    unified, native = policy.first_chunks(frames, states, [TASK, TASK], seed=3)
    for robot in range(2):
        ep = policy.episode(TASK, seed=3)
        ep.start(frames[robot])
        plan = ep.plan()
        np.testing.assert_allclose(unified[robot], plan.actions, atol=1e-5)
        np.testing.assert_allclose(native[robot], policy.native_actions(plan.actions, states[robot]), atol=1e-5)
    assert native.shape == (2, policy.steps_per_chunk, 4) and np.abs(native).max() <= 1.0


# --------------------------------------------------------------------------------------------- import boundary
FORBIDDEN = ("pipelines", "services", "mlflow", "deepspeed", "dvc", "feast", "kserve")


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module, at module level) of every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.module, id(node) in top))
    return out


def test_the_model_package_imports_no_mlops_and_has_no_import_cycle():
    graph = {}
    for path in sorted(MODEL.glob("*.py")):
        imports = _imports(path)
        bad = [name for name, _ in imports if name.split(".")[0] in FORBIDDEN]
        assert not bad, f"{path.name} imports {bad}: model/ knows nothing of pipelines, services or MLOps"
        local = [name for name, _ in imports if name.startswith("model.")]
        assert all(top for name, top in imports if name.startswith("model.")), \
            f"{path.name} imports a model module inside a function"
        graph[f"model.{path.stem}"] = {name for name in local if name != f"model.{path.stem}"}

    def visit(node: str, stack: tuple[str, ...]) -> None:
        assert node not in stack, f"import cycle: {' -> '.join((*stack, node))}"
        for nxt in graph.get(node, ()):
            visit(nxt, (*stack, node))

    for module in graph:
        visit(module, ())
