"""Job configs (raybranch.config.files): YAML plus key=value overrides, coerced to the dataclass field
types; unknown keys and bad values are one-line errors naming the key."""
from __future__ import annotations

import pytest

from raybranch.config.classes import ExperimentConfig
from raybranch.config import ConfigError, RayJobConfig, SweepConfig, load_branches_config, load_sweep_config
from raybranch.errors import RaybranchError


def write(tmp_path, text: str):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides_fill_experiment_and_job(tmp_path):
    p = write(tmp_path, "name: x\nepochs: 5\nlr: 0.1\nmechanisms: [lc]\nstore: file:///tmp/s\nmax_failures: 2\n")
    exp, job = load_branches_config(p, ["epochs=7", "lr=1e-3", "snapshot_every=10", "use_gpu=no", "out=/tmp/o"])
    assert isinstance(exp, ExperimentConfig) and isinstance(job, RayJobConfig)
    assert (exp.name, exp.epochs, exp.lr, exp.mechanisms, exp.snapshot_every) == ("x", 7, 1e-3, ("lc",), 10)
    assert (job.store, job.max_failures, job.use_gpu, job.out) == ("file:///tmp/s", 2, False, "/tmp/o")
    assert exp.batch_size == ExperimentConfig().batch_size and job.checkpointer == "sync"  # defaults kept


@pytest.mark.parametrize(
    ("override", "field", "value"),
    [
        ("epochs=3", "epochs", 3),
        ("lr=0.5", "lr", 0.5),
        ("lr=2", "lr", 2.0),
        ("compare_lora_merge=true", "compare_lora_merge", True),
        ("compare_lora_merge=Off", "compare_lora_merge", False),
        ("snapshot_every=null", "snapshot_every", None),
        ("snapshot_every=", "snapshot_every", None),
        ("data_dir=None", "data_dir", None),
        ("mechanisms=lc,lc+dlora", "mechanisms", ("lc", "lc+dlora")),
        ("mechanisms=[lc+dlora]", "mechanisms", ("lc+dlora",)),
        ("split=70/10/10/10", "split", "70/10/10/10"),
        ("name=007", "name", "007"),  # a string stays as written (YAML would read an octal 7)
    ],
)
def test_override_values_are_read_for_the_field_type(override, field, value):
    exp, _ = load_branches_config(None, [override])
    got = getattr(exp, field)
    assert got == value and type(got) is type(value)


def test_yaml_values_are_coerced_and_checked(tmp_path):
    exp, _ = load_branches_config(write(tmp_path, "lr: 1\nepochs: 4.0\nsplit: 20x5\npoison_slice: 2\n"))
    assert exp.lr == 1.0 and type(exp.lr) is float and exp.epochs == 4 and type(exp.epochs) is int
    with pytest.raises(ConfigError, match=r"config key 'epochs' needs an integer, got 4.5"):
        load_branches_config(write(tmp_path, "epochs: 4.5\n"))
    with pytest.raises(ConfigError, match=r"config key 'compare_lora_merge' needs true or false"):
        load_branches_config(write(tmp_path, "compare_lora_merge: maybe\n"))


def test_unknown_key_is_one_line_error_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_branches_config(write(tmp_path, "epoch: 3\n"))
    msg = str(e.value)
    assert "\n" not in msg and "'epoch'" in msg and "did you mean 'epochs'" in msg and "c.yaml" in msg
    with pytest.raises(ConfigError, match=r"unknown config key 'zzz' \(in the overrides\); known keys: .*batch_size"):
        load_branches_config(None, ["zzz=1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'ephocs' \(in the overrides, under experiment\.\)"):
        load_sweep_config(None, ["experiment.ephocs=1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'epohcs'"):
        load_sweep_config(write(tmp_path, "experiment:\n  epohcs: 2\n"))


def test_bad_input_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'epochs' is not key=value"):
        load_branches_config(None, ["epochs"])
    with pytest.raises(ConfigError, match=r"is not valid YAML at line 2"):
        load_branches_config(write(tmp_path, "a: 1\nb: c: d\n"))
    with pytest.raises(ConfigError, match=r"must be a mapping"):
        load_branches_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match=r"cannot read config"):
        load_branches_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"poison_slice 9 is not one of the slices 1..4"):
        load_branches_config(None, ["poison_slice=9"])
    with pytest.raises(ConfigError, match=r"checkpointer must be one of"):
        load_branches_config(None, ["checkpointer=fast"])
    with pytest.raises(ConfigError, match=r"num_workers must be a positive number"):
        load_branches_config(None, ["num_workers=0"])
    with pytest.raises(ConfigError, match=r"checkpointer='async' needs num_workers=1"):
        load_branches_config(None, ["num_workers=2", "checkpointer=async"])
    assert load_branches_config(None, ["num_workers=2"])[1].num_workers == 2


def test_sweep_config_grid_keys_and_base_experiment(tmp_path):
    cfg = load_sweep_config("jobs/configs/sweep.yaml")
    assert isinstance(cfg, SweepConfig)
    assert cfg.ranks == (1, 2, 4, 8, 16) and cfg.splits == ("4x25", "20x5", "80x1.25", "70/10/10/10")
    cfg = load_sweep_config("jobs/configs/sweep.yaml", ["ranks=4", "snapshot_every=[null, 10]", "bits=2,3",
                                                        "scheduler=asha", "experiment.epochs=3"])
    assert cfg.ranks == (4,) and cfg.snapshot_every == (None, 10) and cfg.bits == (2, 3) and cfg.scheduler == "asha"
    base = cfg.base_experiment()
    assert base.epochs == 3 and base.patience == 2  # override on top of the file's experiment mapping
    with pytest.raises(ConfigError, match=r"scheduler must be one of"):
        load_sweep_config(None, ["scheduler=hyperband"])
    with pytest.raises(ConfigError, match=r"mechanisms must be among"):
        load_sweep_config(None, ["mechanisms=lora"])
    with pytest.raises(RaybranchError, match=r"split spec '3x3' sums to 9 %"):
        load_sweep_config(None, ["splits=3x3"])


def test_shipped_configs_load():
    for name in ("quick", "demo"):
        exp, job = load_branches_config(f"jobs/configs/{name}.yaml")
        assert exp.name == name and job.out == f"out/{name}" and exp.mechanisms == ("lc", "lc+dlora")
    assert load_sweep_config("jobs/configs/sweep-quick.yaml").splits == ("4x25",)
