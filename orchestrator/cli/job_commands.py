"""The ``submit``, ``status``, ``logs`` and ``stop`` commands (see :mod:`orchestrator.jobs`)."""

from __future__ import annotations

import shutil
import sys
import time

COMMANDS = ("submit", "status", "logs", "stop")
POLL_S = 2.0


def add_parsers(sub, study_args) -> None:
    address = "the cluster's job API (dashboard), e.g. http://HOST:8265; default RAY_API_SERVER_ADDRESS"
    s = sub.add_parser("submit", help="run a study on a remote Ray cluster as a Ray job (validated here first)")
    study_args(s)
    s.add_argument("--address", default=None, help=address)
    s.add_argument("--tracking-uri", default=None, help="MLflow tracking URI the cluster reaches (overrides the spec's)")
    s.add_argument("--storage-path", default=None, help="checkpoint storage every node reaches (s3://..., a shared mount)")
    s.add_argument("--working-dir", default=".", help="project folder uploaded with the job (default: here; .gitignore respected)")
    s.add_argument("--pip-pinned", action="store_true", help="have Ray install transferlab's dependencies at the versions installed here")
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    mode.add_argument("--follow", action="store_true", help="stream the job's log until it ends")
    for name, text in (("status", "state of a submitted study job"), ("logs", "a submitted job's log"),
                       ("stop", "stop a submitted job (finished runs stay in MLflow; submit again to resume)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("job", metavar="JOB", help="job id printed by submit")
        p.add_argument("--address", default=None, help=address)
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="keep printing until the job ends")


def run(args) -> int:
    from orchestrator import jobs

    if args.command == "submit":
        return _submit(args)
    client = jobs.connect(args.address)
    info = jobs.job_info(client, args.job)
    if args.command == "status":
        print("\n".join(jobs.describe(info)))
    elif args.command == "logs":
        if args.follow:
            jobs.tail_logs(client, args.job, sys.stdout)
        else:
            sys.stdout.write(jobs.scrub(client.get_job_logs(args.job)))
    else:
        return _stop(client, args.job, info)
    return 0


def _submit(args) -> int:
    from orchestrator import jobs
    from orchestrator.plan import build_plan
    from orchestrator.spec import load_spec

    spec = load_spec(args.study_file, args.overrides, quick=args.quick)
    url = jobs.job_api_url(args.address)
    loopback = jobs.is_loopback(url)
    # Where results go and what is uploaded first (cheap), then the data, as `validate` does.
    sub, doc = jobs.build_submission(spec, args.study_file, args.working_dir, args.tracking_uri, args.storage_path,
                                     loopback, args.pip_pinned)
    plan = build_plan(spec)
    if loopback:  # a cluster on this machine uses the files here: check them as `run` does
        _check_local_stores(sub)
    print(f"ok: study '{spec.study}': {len(plan.pretrain_jobs)} pretraining runs, {plan.num_transfer_fits} transfer fits "
          f"on {len(spec.transfer_tasks)} task(s)")
    print(f"tracking: {jobs.scrub(sub.tracking_uri)}   storage: {sub.storage}")
    client = jobs.connect(url)
    staged = jobs.stage(sub, doc, args.working_dir)
    try:
        job_id, submitted = jobs.submit(client, sub, staged)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    if submitted:
        print(f"uploaded {len(sub.files) + 1} files ({sub.size_bytes / 2**20:.1f} MiB)"
              + (f", {len(sub.pip)} pinned requirements" if sub.pip else ""))
        print(f"submitted: {job_id}")
    else:
        print(f"already running: {job_id} (the same study, tracking URI and storage); not submitting a second copy")
    print(f"  transferlab status {job_id} --address {url}\n  transferlab logs {job_id} --address {url} --follow\n"
          f"  transferlab stop {job_id} --address {url}")
    if args.no_wait:
        return 0
    if args.follow:
        jobs.tail_logs(client, job_id, sys.stdout)
    info = _wait(client, job_id, show=not args.follow)
    print("\n".join(jobs.describe(info)))
    return jobs.exit_code(info)


def _check_local_stores(sub) -> None:
    from orchestrator import jobs
    from orchestrator.preflight import check_storage, check_tracking
    from orchestrator.spec import SpecError

    tracking, storage = jobs.local_stores(sub)
    for name, value, check in (("--tracking-uri", tracking, check_tracking), ("--storage-path", storage, check_storage)):
        if value:
            try:
                check(value)
            except ValueError as e:
                raise SpecError(name, str(e)) from None


def _wait(client, job_id: str, show: bool, timeout_s: float | None = None):
    from orchestrator import jobs

    seen, t0 = None, time.monotonic()
    while True:
        info = jobs.job_info(client, job_id)
        status = jobs._status_name(info.status)
        if status in jobs.TERMINAL or (timeout_s is not None and time.monotonic() - t0 > timeout_s):
            return info
        if show and status != seen:
            print(f"{job_id}: {status}", flush=True)
            seen = status
        time.sleep(POLL_S)


def _stop(client, job_id: str, info) -> int:
    from orchestrator import jobs

    if jobs._status_name(info.status) in jobs.TERMINAL:
        print(f"{job_id} already ended: {jobs._status_name(info.status)}")
        return 0
    client.stop_job(job_id)
    info = _wait(client, job_id, show=False, timeout_s=60)
    print(f"{job_id}: {jobs._status_name(info.status)}; finished runs stay in MLflow (submit the study again to resume)")
    return 0
