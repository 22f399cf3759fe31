"""The ``transferlab`` command line's arguments (one sub-parser per command)."""

from __future__ import annotations

import argparse

import orchestrator
from orchestrator.spec import COUNTERFACTUAL_ARMS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="transferlab",
        description="Transfer-learning studies on Ray, recorded in MLflow.",
    )
    p.add_argument("--version", action="version", version=f"transferlab {orchestrator.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _study_parsers(sub)
    _job_parsers(sub, _study_args)
    _data_parsers(sub)
    _analysis_parsers(sub)
    return p


def _study_args(sp) -> None:
    """The arguments every command that reads a study file takes."""
    sp.add_argument("study_file", metavar="STUDY.yaml", help="study spec file")
    sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override spec fields, e.g. pretrain.epochs=1")
    sp.add_argument(
        "--quick",
        action="store_true",
        help="apply the study file's quick: section (a toy-size variant, named STUDY-quick)",
    )


def _study_parsers(sub) -> None:
    v = sub.add_parser("validate", help="check a study spec and its data without running anything")
    _study_args(v)
    c = sub.add_parser(
        "config", help="print the study file as it would run: overrides and --quick applied, data paths resolved"
    )
    _study_args(c)
    sub.add_parser(
        "schema",
        help="print the JSON Schema of study files, for editors (# yaml-language-server: $schema=FILE)",
    )

    pl = sub.add_parser(
        "plan", help="print what `run` would do (jobs to run / cached / resumed, trials, estimated time); runs nothing"
    )
    _study_args(pl)
    pl.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (overrides the spec's tracking_uri)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.add_argument("--rerun-changed", action="store_true", help="plan as `run --rerun-changed` would run")

    r = sub.add_parser("run", help="run a study (skipping every run MLflow already holds)")
    _study_args(r)
    r.add_argument(
        "--fail-fast",
        action="store_true",
        help="stop the study at the first failed trial (default: record it FAILED and go on)",
    )
    r.add_argument(
        "--rerun-changed",
        action="store_true",
        help="also compute again the finished runs whose code digest (trainers/, datasets_/) is not today's, and "
        "the transfer fits of pretraining runs computed again; the old runs are kept, tagged transferlab.superseded_by",
    )
    r.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join ('auto' for a `ray start` cluster); default: a private local Ray",
    )
    r.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (overrides the spec's tracking_uri)")
    r.add_argument("--storage-path", default=None, help="where checkpoints go (default: ./transferlab_storage)")
    r.add_argument(
        "--verbose",
        action="store_true",
        help="forward the trials' own output and errors, each line with its process and node (always on in a job)",
    )


def _data_parsers(sub) -> None:
    d = sub.add_parser("data", help="prepare and inspect datasets")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    prep = dsub.add_parser(
        "prepare",
        help="convert a source (builtin:NAME, image folder, WebDataset tars, Parquet) to Parquet or WebDataset shards "
        "+ manifest",
    )
    prep.add_argument(
        "src", help="builtin:NAME, an image folder, a .tar / {00000..00009}.tar pattern / folder of tars, or Parquet"
    )
    prep.add_argument(
        "--out",
        required=True,
        help="output directory (a dataset already there is replaced; any other folder is refused), or s3://bucket/prefix",
    )
    prep.add_argument(
        "--format",
        choices=["parquet", "webdataset"],
        default="parquet",
        help="output shards: parquet (default) or img2dataset-compatible webdataset tars",
    )
    prep.add_argument("--shard-size", type=int, default=2000, help="samples per shard (default 2000)")
    prep.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        help="held-out share for sources without their own split (default 0.2)",
    )
    prep.add_argument(
        "--on-bad-sample",
        choices=["skip", "error"],
        default="skip",
        help="skip and count bad samples (default) or stop at the first",
    )
    ins = dsub.add_parser("inspect", help="print a dataset's manifest (computed by a scan if it has none)")
    ins.add_argument("uri", metavar="DIR_OR_URI")
    ins.add_argument("--json", action="store_true", help="print the manifest as JSON")
    ver = dsub.add_parser("verify", help="hash every shard of a prepared dataset and compare with its manifest")
    ver.add_argument("uri", metavar="DIR_OR_URI")
    ov = dsub.add_parser("overlap", help="exact and near-duplicate images between two datasets (leakage check)")
    ov.add_argument("a", metavar="A", help="builtin:NAME or a prepared dataset directory (e.g. a pretraining source)")
    ov.add_argument("b", metavar="B", help="builtin:NAME or a prepared dataset directory (e.g. a downstream task)")
    ov.add_argument(
        "--max-distance",
        type=int,
        default=10,
        help="dHash Hamming distance of near-duplicate candidates (default 10 of 64 bits); candidates are confirmed "
        "on 16x16 thumbnails",
    )
    ov.add_argument("--json", action="store_true", help="print every pair as JSON")
    for sp in (prep, ins):
        sp.add_argument(
            "--image-column", default="jpg", help="Parquet sources: encoded-image column (default jpg, else image)"
        )
        sp.add_argument("--label-column", default="label", help="Parquet sources: integer label column")
        sp.add_argument("--caption-column", default="caption", help="Parquet sources: caption column")
        sp.add_argument("--key-column", default="key", help="Parquet sources: sample key column")
        sp.add_argument(
            "--allow-compressed",
            action="store_true",
            help="read gzip/bzip2/xz tars (refused by default: a few kB can unpack to gigabytes)",
        )


def _analysis_parsers(sub) -> None:
    q = sub.add_parser("runs", help="print a study's results table from MLflow")
    q.add_argument("study", help="study name (the MLflow experiment)")
    q.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's default store here)")
    fmt = q.add_mutually_exclusive_group()
    fmt.add_argument(
        "--csv", action="store_true", help="every finished transfer run as one CSV row, with its pretraining settings"
    )
    fmt.add_argument("--json", action="store_true", help="the same rows as a JSON list")

    rep = sub.add_parser("report", help="the papers' figures and fits for a study, as one HTML file (+ CSV, PNG, JSON)")
    rep.add_argument("study", help="study name (the MLflow experiment)")
    rep.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's default store here)")
    rep.add_argument("--out", default=None, help="output folder (default: reports/STUDY)")
    rep.add_argument("--json", action="store_true", help="print the fitted numbers as JSON")
    rep.add_argument(
        "--bootstrap", type=int, default=200, help="bootstrap resamples for confidence intervals (default 200)"
    )
    rep.add_argument("--seed", type=int, default=0, help="seed of the bootstraps (default 0)")
    rep.add_argument("--no-log", action="store_true", help="do not log the report as artifacts on the study run")
    cache = rep.add_mutually_exclusive_group()
    cache.add_argument(
        "--refresh",
        action="store_true",
        help="read every run and artifact from MLflow again, rebuilding the local cache "
        "($TRANSFERLAB_CACHE/report/); needed only after values were logged onto runs that had already ended",
    )
    cache.add_argument("--no-cache", action="store_true", help="read everything from MLflow and keep no local copy")

    cfp = sub.add_parser(
        "counterfactual",
        help="plan the follow-up study that removes the K most harmful / helpful / random source classes",
    )
    cfp.add_argument(
        "study", help="study name (the MLflow experiment) with class-subset pretraining runs or a datamodel sweep"
    )
    cfp.add_argument(
        "--spec", required=True, metavar="STUDY.yaml", help="the study's spec file (the follow-up keeps its settings)"
    )
    cfp.add_argument(
        "--quick", action="store_true", help="the study ran with --quick: read the spec's quick: section too"
    )
    cfp.add_argument(
        "--remove-top", required=True, type=int, nargs="+", metavar="K", help="numbers of classes to remove, e.g. 1 2 4"
    )
    cfp.add_argument(
        "--arms", nargs="+", default=list(COUNTERFACTUAL_ARMS), help="which classes to remove (default: all three arms)"
    )
    cfp.add_argument(
        "--task", default=None, help="target task whose influence ranks the classes (default: the first with influence)"
    )
    cfp.add_argument(
        "--source", default=None, help="the source whose classes are removed (default: the study's only source)"
    )
    cfp.add_argument("--name", default=None, help="follow-up study name (default: STUDY-counterfactual)")
    cfp.add_argument("--out", default=".", help="folder for the follow-up YAML and plan (default: here)")
    cfp.add_argument("--seed", type=int, default=0, help="seed of the random arm (default 0)")
    cfp.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="N",
        help="pretraining seeds 0..N-1 of every follow-up source, paired across arms (default: the study's; 16 for a "
        "datamodels study)",
    )
    cfp.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's default store here)")


JOB_COMMANDS = ("submit", "status", "logs", "stop")


def _job_parsers(sub, study_args) -> None:
    address = "the cluster's job API (dashboard), e.g. http://HOST:8265; default RAY_API_SERVER_ADDRESS"
    s = sub.add_parser("submit", help="run a study on a remote Ray cluster as a Ray job (validated here first)")
    study_args(s)
    s.add_argument("--address", default=None, help=address)
    s.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI the cluster reaches (overrides the spec's)"
    )
    s.add_argument(
        "--storage-path", default=None, help="checkpoint storage every node reaches (s3://..., a shared mount)"
    )
    s.add_argument(
        "--working-dir", default=".", help="project folder uploaded with the job (default: here; .gitignore respected)"
    )
    s.add_argument(
        "--pip-pinned",
        action="store_true",
        help="have Ray install transferlab's dependencies at the versions installed here",
    )
    s.add_argument(
        "--send-credentials",
        action="store_true",
        help="send this environment's MLflow credentials in the job's env_vars (Ray's dashboard shows them); "
        "by default the cluster provides its own (docs/cluster.md)",
    )
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    mode.add_argument("--follow", action="store_true", help="stream the job's log until it ends")
    for name, text in (
        ("status", "state of a submitted study job"),
        ("logs", "a submitted job's log"),
        ("stop", "stop a submitted job (finished runs stay in MLflow; submit again to resume)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("job", metavar="JOB", help="job id printed by submit")
        p.add_argument("--address", default=None, help=address)
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="keep printing until the job ends")
