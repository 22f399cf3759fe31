"""Study specs: the quickstart validates; every bad field is one line, exit 2, before compute."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.spec import FULL, load_spec

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


def _write(tmp_path, data) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _quickstart() -> dict:
    return yaml.safe_load(QUICKSTART.read_text())


def test_quickstart_spec_parses_as_written():
    spec = load_spec(QUICKSTART)
    assert spec.study == "quickstart"
    assert spec.sources["mnist"].uri == "builtin:mnist"
    assert spec.pretrain.base.model == "small-cnn" and spec.pretrain.base.epochs == 2
    assert spec.pretrain.sweep["pretrain_size"] == (500, 2000)
    assert spec.pretrain.sweep["label_noise"] == (0.0, 0.4)
    assert spec.transfer.shots == (1, 5, 10, FULL)
    assert spec.transfer.seeds == (0, 1, 2)
    assert spec.resources.workers == 1 and spec.resources.use_gpu is False
    assert spec.tracking_uri is None


def test_bare_off_means_off_as_the_readme_writes_it(tmp_path):
    # YAML 1.1 reads `preflight_overlap: off` as false; the README's spec block writes it bare.
    text = QUICKSTART.read_text() + "\npreflight_overlap: off\n"
    assert load_spec(_write(tmp_path, text)).preflight_overlap == "off"


def test_validate_reports_the_plan(capsys):
    assert main(["validate", str(QUICKSTART)]) == 0
    assert "4 pretraining runs, 40 transfer fits" in capsys.readouterr().out


def test_overrides_change_fields(capsys):
    assert main(["validate", str(QUICKSTART), "pretrain.sweep.pretrain_size=[100]", "transfer.seeds=[0]"]) == 0
    assert "2 pretraining runs, 8 transfer fits" in capsys.readouterr().out


def _mutate(path: str, value):
    def apply(d):
        *parents, last = path.split(".")
        node = d
        for p in parents:
            node = node.setdefault(p, {})
        if value is _DELETE:
            node.pop(last)
        else:
            node[last] = value
        return d

    return apply


_DELETE = object()

BAD = [
    ("study", _DELETE, "study: is required"),
    ("study", "my study!", "study: 'my study!' may hold only"),
    ("study", 12, "study: must be a non-empty string"),
    ("sources", {}, "sources: must be a non-empty mapping"),
    ("sources.mnist", {"url": "builtin:mnist"}, "sources.mnist.url: unknown key; did you mean 'uri'?"),
    ("sources.mnist.uri", "builtin:cifar", "sources.mnist.uri: unknown builtin dataset 'cifar'"),
    ("sources.mnist.uri", "/no/such/dir", "sources.mnist.uri: /no/such/dir: no such directory"),
    ("pretrain.method", "supervized", "pretrain.method: unknown value 'supervized' (did you mean 'supervised'?)"),
    ("pretrain.model", "resnet-18", "pretrain.model: unknown value 'resnet-18'"),
    ("pretrain.epochs", 0, "pretrain.epochs: must be >= 1, got 0"),
    ("pretrain.epochs", "two", "pretrain.epochs: must be an integer, got string 'two'"),
    ("pretrain.epochs", True, "pretrain.epochs: must be an integer, got bool"),
    ("pretrain.lr", -0.1, "pretrain.lr: must be > 0"),
    ("pretrain.epoch", 3, "pretrain.epoch: unknown key; did you mean 'epochs'?"),
    ("pretrain.sweep.label_noise", [0.0, 1.4], "pretrain.sweep.label_noise[1]: must be in [0, 1], got 1.4"),
    ("pretrain.sweep.label_noise", [], "pretrain.sweep.label_noise: must not be empty"),
    ("pretrain.sweep.pretrain_size", [500, -5], "pretrain.sweep.pretrain_size[1]: must be >= 1, got -5"),
    ("pretrain.sweep.pretrain_size", [500, 500], "pretrain.sweep.pretrain_size[1]: duplicate value 500"),
    ("pretrain.sweep.pretrain_size", [10**6], "pretrain.sweep.pretrain_size[0]: 1000000 exceeds the"),
    ("pretrain.sweep.source", ["imagenet"], "pretrain.sweep.source[0]: unknown value 'imagenet'"),
    ("pretrain.sweep.sizes", [1], "pretrain.sweep.sizes: unknown key"),
    (
        "transfer.protocol",
        ["linear-probe"],
        "transfer.protocol[0]: unknown value 'linear-probe' (did you mean 'linear_probe'?)",
    ),
    ("transfer.shots", [1, 0], "transfer.shots[1]: must be >= 1, got 0"),
    ("transfer.shots", ["all"], "transfer.shots[0]: must be a positive integer or 'full'"),
    ("transfer.shots", [1, 500], "transfer.shots[1]: 500 shots exceed the"),
    ("transfer.seeds", [0, -1], "transfer.seeds[1]: must be >= 0, got -1"),
    ("resources.workers", 0, "resources.workers: must be >= 1, got 0"),
    ("resources.use_gpu", "yes", "resources.use_gpu: must be true or false"),
    ("resources.gpus", 1, "resources.gpus: unknown key"),
    (
        "resources.light_trial_gpus",
        0.5,
        "resources.light_trial_gpus: applies to GPU trials only: set resources.use_gpu: true",
    ),
    ("tracking_uri", "mlflow.db", "tracking_uri: tracking URI 'mlflow.db' has no scheme"),
    ("trackinguri", None, "trackinguri: unknown key; did you mean 'tracking_uri'?"),
    ("sources.mnist.keep_classes", [0, 12], "sources.mnist.keep_classes: unknown class '12'"),
    (
        "sources.mnist.drop_classes",
        [str(i) for i in range(10)],
        "sources.mnist: keep_classes/drop_classes leave no class",
    ),
    ("sources.mnist.caption_matches", "digit (", "sources.mnist.caption_matches: invalid regular expression 'digit ('"),
    (
        "sources.mnist.caption_matches",
        "^zebra",
        "sources.mnist: its class and caption filters leave no training sample",
    ),
    ("tasks.digits.keep_classes", [0], "tasks.digits.keep_classes: unknown key; allowed: uri"),
    ("pretrain.class_balanced", "yes", "pretrain.class_balanced: must be true or false"),
    ("pretrain.noise_pattern", "pairs", "pretrain.noise_pattern: unknown value 'pairs'"),
    ("pretrain.sweep.class_fraction", [0.0], "pretrain.sweep.class_fraction[0]: must be in (0, 1], got 0"),
    ("preflight_overlap", "strict", "preflight_overlap: unknown value 'strict'; choose from: off, warn, error"),
    ("pretrain.pack", "yes", "pretrain.pack: unknown value 'yes'; choose from: auto, off"),
    ("pretrain.sweep.pack", ["off"], "pretrain.sweep.pack: unknown key"),  # how, not what: not an axis
]


@pytest.mark.parametrize(
    "path,value,message", BAD, ids=[(f"{p} deleted" if v is _DELETE else f"{p}={v!r}")[:60] for p, v, _ in BAD]
)
def test_bad_field_is_one_line_exit_2(tmp_path, capsys, monkeypatch, path, value, message):
    monkeypatch.chdir(tmp_path)
    study = _write(tmp_path, _mutate(path, value)(_quickstart()))
    assert main(["run", str(study)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: {message}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]  # no store, no storage


@pytest.mark.parametrize(
    "text,message",
    [
        ("study: [unclosed", "invalid YAML at line 1"),
        ("", "the study file is empty"),
        ("- just\n- a list\n", "study file: must be a mapping, got list"),
        ("!!python/object/apply:os.system ['echo hacked']\n", "invalid YAML"),
        ("study: x\nsources: !!python/name:os.system {}\n", "invalid YAML"),
    ],
)
def test_unreadable_or_hostile_yaml(tmp_path, capsys, text, message):
    assert main(["validate", str(_write(tmp_path, text))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_missing_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read study file" in capsys.readouterr().err


def test_console_script_exits_2_without_traceback(tmp_path):
    data = _quickstart()
    data["pretrain"]["sweep"]["label_noise"] = [0.0, 2]
    study = _write(tmp_path, data)
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", str(study)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: pretrain.sweep.label_noise[1]: must be in [0, 1], got 2"
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "transferlab_storage").exists()


def test_relative_dataset_paths_resolve_against_the_study_file(tmp_path):
    from datasets_ import prepare_builtin

    prepare_builtin("digits", root=tmp_path / "data")
    (tmp_path / "studies").mkdir()
    text = textwrap.dedent(
        """
        study: rel
        sources: {d: {uri: ../data/builtin/digits-v2}}
        tasks: {t: {uri: "builtin:digits"}}
        pretrain: {model: tiny-cnn}
        transfer: {shots: [1]}
        """
    )
    spec = load_spec(_write(tmp_path / "studies", text))
    assert spec.sources["d"].uri == str((tmp_path / "data" / "builtin" / "digits-v2").resolve())


def test_head_weight_decay_enters_the_config_hash_and_params_only_when_set():
    """Unset (or null), a run's hash and MLflow params are those it had before the field existed;
    set, the run is a new configuration whose params carry it, and the trainer gets it."""
    from orchestrator.planning.plan import build_plan
    from orchestrator.spec import parse_spec

    def runs(**pretrain):
        data = _quickstart()
        data["pretrain"].update(pretrain)
        data["pretrain"]["sweep"] = {"pretrain_size": [500]}
        return build_plan(parse_spec(data)).pretrain_runs

    (unset,), (null,), (set_,) = runs(), runs(head_weight_decay=None), runs(head_weight_decay=0.1)
    assert unset.config_hash == null.config_hash != set_.config_hash
    assert "head_weight_decay" not in unset.settings.hashed() and "head_weight_decay" not in unset.params
    assert set_.params["head_weight_decay"] == 0.1 and set_.config.head_weight_decay == 0.1
    assert unset.config.head_weight_decay is None
    swept = build_plan(
        parse_spec(
            {**_quickstart(), "pretrain": {**_quickstart()["pretrain"], "sweep": {"head_weight_decay": [0.0, 1.0]}}}
        )
    ).pretrain_runs
    assert sorted(r.config.head_weight_decay for r in swept) == [0.0, 1.0]
    assert all("head_weight_decay=" in r.run_name for r in swept)
