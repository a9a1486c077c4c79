"""Teacher checkpoints: round trips (.pt with weights_only=True, .safetensors), one-line
errors for missing / tampered / truncated / mismatched files, teachers loaded by a
federated client and by the centralized runner, and ``runner=train_teachers``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from abd_fl.checkpoints import CheckpointError, client_checkpoint_paths, load_state_dict_file, load_teacher, save_state_dict
from abd_fl.config import ConfigError, validate_config
from abd_fl.experiment import build_bundle, build_named_model, check_teacher_checkpoints, prepare_run
from abd_fl.local_update import client_update
from abd_fl.models import build_model
from abd_fl.paths import compose_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small(seed: int = 0, name: str = "cnn_small") -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(name, 10, 1, (0.3,), (0.4,)).eval()


def same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_round_trip(tmp_path: Path, suffix: str) -> None:
    teacher = small(1)
    path = save_state_dict(teacher, tmp_path / f"teacher{suffix}")
    state = load_state_dict_file(path)
    assert set(state) == set(teacher.state_dict())
    assert all(torch.equal(state[k], v) for k, v in teacher.state_dict().items())
    loaded = load_teacher(small(2), path)
    assert same_outputs(loaded, teacher) and not same_outputs(small(2), teacher)


def test_pt_files_load_with_weights_only_and_a_wrapped_state_dict(tmp_path: Path, monkeypatch) -> None:
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    teacher = small(3)
    torch.save({"state_dict": teacher.state_dict(), "epoch": 7}, tmp_path / "wrapped.pt")
    assert same_outputs(load_teacher(small(4), tmp_path / "wrapped.pt"), teacher)
    assert calls and all(c.get("weights_only") is True and c.get("map_location") == "cpu" for c in calls)


class _Payload:
    """Unpickling this would create a folder: a stand-in for code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_a_tampered_file_is_rejected_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"conv.weight": torch.zeros(1), "hook": _Payload(marker)}, path)
    with pytest.raises(CheckpointError) as err:
        load_state_dict_file(path)
    assert "rejected by torch.load(weights_only=True)" in _one_line(err) and str(path) in str(err.value)
    assert not marker.exists()


def test_truncated_and_foreign_files_are_rejected(tmp_path: Path) -> None:
    good = save_state_dict(small(), tmp_path / "good.pt")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    cut_st = tmp_path / "cut.safetensors"
    cut_st.write_bytes(save_state_dict(small(), tmp_path / "g.safetensors").read_bytes()[:40])
    for path, message in ((cut, "tampered, truncated"), (text, "tampered, truncated"), (cut_st, "not a readable safetensors file")):
        with pytest.raises(CheckpointError) as err:
            load_state_dict_file(path)
        assert message in _one_line(err), path


def test_non_state_dicts_missing_files_and_extensions(tmp_path: Path) -> None:
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    torch.save({"w": torch.zeros(2), "step": 3}, tmp_path / "mixed.pt")
    torch.save({"w": torch.tensor([float("nan")])}, tmp_path / "nan.pt")
    cases = [
        (tmp_path / "list.pt", "does not hold a state dict (name -> tensor), got list"),
        (tmp_path / "mixed.pt", "is not a state dict: entries ['step'] are not name -> tensor"),
        (tmp_path / "nan.pt", "has non-finite values in 'w'"),
        (tmp_path / "absent.pt", "teacher checkpoint not found"),
        (tmp_path / "model.ckpt", "unsupported extension '.ckpt'; use one of: .pt, .pth, .safetensors"),
    ]
    for path, message in cases:
        with pytest.raises(CheckpointError) as err:
            load_state_dict_file(path)
        assert message in _one_line(err), path


def test_keys_and_shapes_must_fit_the_model(tmp_path: Path) -> None:
    state = small().state_dict()
    extra = {**state, "backdoor.extra": torch.zeros(2)}
    lacking = {k: v for k, v in state.items() if k != next(iter(state))}
    save_state_dict(extra, tmp_path / "extra.pt")
    save_state_dict(lacking, tmp_path / "lacking.safetensors")
    save_state_dict(small(name="cnn"), tmp_path / "bigger.pt")
    with pytest.raises(CheckpointError) as err:
        load_teacher(small(), tmp_path / "extra.pt", model_name="cnn_small")
    assert "does not fit model 'cnn_small'" in _one_line(err) and "unexpected keys ['backdoor.extra'] (1)" in str(err.value)
    with pytest.raises(CheckpointError) as err:
        load_teacher(small(), tmp_path / "lacking.safetensors")
    assert f"missing keys ['{next(iter(state))}'] (1)" in _one_line(err)
    with pytest.raises(CheckpointError) as err:
        load_teacher(small(), tmp_path / "bigger.pt")
    assert "in the file" in _one_line(err) and "in the model" in str(err.value)


def test_client_checkpoint_specs(tmp_path: Path) -> None:
    for pid in (1, 3):
        save_state_dict(small(pid), tmp_path / f"client_{pid}.pt")
    assert client_checkpoint_paths(str(tmp_path), 6) == {1: tmp_path / "client_1.pt", 3: tmp_path / "client_3.pt"}
    assert client_checkpoint_paths({"2": "/x/a.pt", 4: "/x/b.pt"}, 6) == {2: Path("/x/a.pt"), 4: Path("/x/b.pt")}
    for spec, message in (
        ({9: "/x/a.pt"}, "keys must be partition ids in [0, 5], got 9"),
        ({"one": "/x/a.pt"}, "keys must be partition ids in [0, 5], got 'one'"),
        (str(tmp_path / "nowhere"), "folder not found"),
        (str(tmp_path / "client_1.pt"), "folder not found"),
        ([1, 2], "must be null, a folder or a mapping"),
    ):
        with pytest.raises(CheckpointError) as err:
            client_checkpoint_paths(spec, 6)
        assert message in _one_line(err)


# ---- runs that load teachers --------------------------------------------------------
def _tiny(*extra: str) -> dict:
    return compose_config(["experiment=tiny", "attack.malicious_ids=[1]", "defense=none", "clean_kd_reference.enabled=false", *extra])


def test_checkpoint_config_errors(tmp_path: Path) -> None:
    good = str(save_state_dict(build_named_model(_tiny(), build_bundle(_tiny()), "client"), tmp_path / "t.pt"))
    for overrides, message in (
        ([f"teacher_checkpoint={good}"], "teacher_checkpoint is for runner=centralized, got runner=federated"),
        (["runner=centralized", f"teacher_checkpoint={tmp_path / 'absent.pt'}"], "teacher_checkpoint: teacher checkpoint not found"),
        (["runner=centralized", f"teacher_checkpoint={tmp_path / 't.bin'}"], "unsupported extension '.bin'"),
        ([f"attack.teacher_checkpoints={{0:{good}}}"], "names partition ids [0] that never attack in this run; malicious clients: [1]"),
        (["runner=centralized", f"attack.teacher_checkpoints={{1:{good}}}"], "attack.teacher_checkpoints is for runner=federated"),
    ):
        with pytest.raises(ConfigError) as err:
            validate_config(_tiny(*overrides))
        assert message in _one_line(err), overrides
    validate_config(_tiny(f"attack.teacher_checkpoints={{1:{good}}}"))
    folder = tmp_path / "folder"
    save_state_dict(small(), folder / "client_2.pt")
    with pytest.raises(ConfigError) as err:
        validate_config(_tiny(f"attack.teacher_checkpoints={folder}"))
    assert "has files for clients [2] but none for the malicious clients [1]" in _one_line(err)
    save_state_dict(small(), tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match="does not fit model 'cnn'"):  # contents: checked when a run is prepared
        prepare_run(_tiny("runner=centralized", f"teacher_checkpoint={tmp_path / 'wrong.pt'}"))


def test_an_attacking_client_sends_its_loaded_teacher(tmp_path: Path) -> None:
    cfg0 = _tiny()
    bundle = build_bundle(cfg0)
    teacher = build_named_model(cfg0, bundle, "client", seed=123)
    save_state_dict(teacher, tmp_path / "client_1.safetensors")
    cfg = _tiny(f"attack.teacher_checkpoints={tmp_path}")
    check_teacher_checkpoints(cfg)
    global_state = build_named_model(cfg, bundle, "client").state_dict()
    update = client_update(cfg, 1, 1, global_state)
    assert update.malicious and update.from_checkpoint and same_outputs(update.model, teacher)
    assert 0.0 <= update.stats["accuracy"] <= 1.0
    benign = client_update(_tiny("simulation.local_epochs=0", f"attack.teacher_checkpoints={tmp_path}"), 0, 1, global_state)
    assert not benign.from_checkpoint


def test_train_teachers_then_centralized_uses_the_loaded_teacher(tmp_path: Path) -> None:
    from abd_fl.centralized import central_teacher, run_centralized
    from abd_fl.teachers import run_train_teachers

    out = tmp_path / "teachers"
    cfg = _tiny("runner=train_teachers", f"output_dir={tmp_path / 'runs'}", f"teachers.out={out}", "teachers.format=safetensors")
    report = run_train_teachers(cfg)
    assert set(report["teachers"]) == {"central", "client_1"}
    saved = json.loads((out / "teachers.json").read_text())
    assert saved["trigger"] == cfg["attack"]["trigger"] and saved["teachers"]["client_1"]["partition_id"] == 1
    for entry in saved["teachers"].values():
        assert (out / entry["file"]).is_file() and {"acc", "asr", "asr_floor"} <= set(entry)

    central = _tiny("runner=centralized", f"teacher_checkpoint={out / 'central.safetensors'}", f"output_dir={tmp_path / 'runs'}",
                    "distill.iterations=1")
    setup = prepare_run(central)
    loaded = central_teacher(central, setup.device)
    reference = load_teacher(build_named_model(central, setup.bundle, "client", seed=99), out / "central.safetensors")
    assert same_outputs(loaded, reference)
    summary = run_centralized(central)
    assert summary["malicious_teacher"]["acc"] == pytest.approx(saved["teachers"]["central"]["acc"])
    assert summary["malicious_teacher"]["asr"] == pytest.approx(saved["teachers"]["central"]["asr"])


def test_cli_rejects_a_tampered_teacher_before_starting_anything(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"hook": _Payload(tmp_path / "pwned")}, path)
    proc = subprocess.run(
        [sys.executable, "-m", "abd_fl.cli", "runner=centralized", f"teacher_checkpoint={path}", f"output_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "abd-fl: checkpoint error: teacher checkpoint" in proc.stderr and "weights_only=True" in proc.stderr
    assert not (tmp_path / "pwned").exists()
