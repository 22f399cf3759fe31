"""``submit``, ``status``, ``logs`` and ``stop``: studies as Ray jobs on a remote cluster
(:mod:`orchestrator.execution.ray_jobs`)."""

from __future__ import annotations

import shutil
import sys
import time

from orchestrator.cli.exits import EXIT_OK
from orchestrator.execution import ray_jobs as jobs
from orchestrator.execution.preflight import check_storage, check_tracking
from orchestrator.planning.plan import build_plan
from orchestrator.spec import SpecError, load_spec

# How often a waiting submit/stop asks the job server for the status: one small request, so a
# job that ends (or stops) is reported within half a second.
POLL_S = 0.5


def run(args) -> int:
    if args.command == "submit":
        return _submit(args)
    client = jobs.connect(args.address)
    info = jobs.job_info(client, args.job)
    if args.command == "status":
        print("\n".join(jobs.describe(info)))
        # A script can tell how the study ended: a job still pending or running is 0.
        return jobs.exit_code(info) if jobs.status_name(info.status) in jobs.TERMINAL else EXIT_OK
    elif args.command == "logs":
        if args.follow:
            jobs.tail_logs(client, args.job, sys.stdout)
        else:
            sys.stdout.write(jobs.scrub(client.get_job_logs(args.job)))
    else:
        return _stop(client, args.job, info)
    return EXIT_OK


def _submit(args) -> int:
    spec = load_spec(args.study_file, args.overrides, quick=args.quick)
    url = jobs.job_api_url(args.address)
    loopback = jobs.is_loopback(url)
    # Where results go and what is uploaded first (cheap), then the data, as `validate` does.
    sub, doc = jobs.build_submission(
        spec,
        args.study_file,
        args.working_dir,
        args.tracking_uri,
        args.storage_path,
        loopback,
        args.pip_pinned,
        args.send_credentials,
    )
    if sub.credentials:
        print(f"warning: {jobs.SENT}" if args.send_credentials else f"note: {jobs.NOT_SENT}", file=sys.stderr)
    plan = build_plan(spec)
    if loopback:  # a cluster on this machine uses the files here: check them as `run` does
        _check_local_stores(sub)
    print(
        f"ok: study '{spec.study}': {len(plan.pretrain_runs)} pretraining runs, {plan.num_transfer_fits} transfer fits "
        f"on {len(spec.transfer_tasks)} task(s)"
    )
    print(f"tracking: {jobs.scrub(sub.tracking_uri)}   storage: {jobs.scrub(sub.storage)}")
    client = jobs.connect(url)
    staged = jobs.stage(sub, doc, args.working_dir)
    try:
        job_id, submitted = jobs.submit(client, sub, staged)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    if submitted:
        print(
            f"uploaded {len(sub.files) + 1} files ({sub.size_bytes / 2**20:.1f} MiB)"
            + (f", {len(sub.pip)} pinned requirements" if sub.pip else "")
        )
        print(f"  {jobs.upload_summary(sub.files + [sub.study_path])}")
        print(f"submitted: {job_id}")
    else:
        print(f"already running: {job_id} (the same study, tracking URI and storage); not submitting a second copy")
    print(
        f"  transferlab status {job_id} --address {url}\n  transferlab logs {job_id} --address {url} --follow\n"
        f"  transferlab stop {job_id} --address {url}"
    )
    if args.no_wait:
        return EXIT_OK
    if args.follow:
        jobs.tail_logs(client, job_id, sys.stdout)
    info = _wait(client, job_id, show=not args.follow)
    print("\n".join(jobs.describe(info)))
    return jobs.exit_code(info)


def _check_local_stores(sub) -> None:
    tracking, storage = jobs.local_stores(sub)
    for name, value, check in (
        ("--tracking-uri", tracking, check_tracking),
        ("--storage-path", storage, check_storage),
    ):
        if value:
            try:
                check(value)
            except ValueError as e:
                raise SpecError(name, str(e)) from None


def _wait(client, job_id: str, show: bool, timeout_s: float | None = None):
    seen, t0 = None, time.monotonic()
    while True:
        info = jobs.job_info(client, job_id)
        status = jobs.status_name(info.status)
        if status in jobs.TERMINAL or (timeout_s is not None and time.monotonic() - t0 > timeout_s):
            return info
        if show and status != seen:
            print(f"{job_id}: {status}", flush=True)
            seen = status
        time.sleep(POLL_S)


def _stop(client, job_id: str, info) -> int:
    if jobs.status_name(info.status) in jobs.TERMINAL:
        print(f"{job_id} already ended: {jobs.status_name(info.status)}")
        return EXIT_OK
    client.stop_job(job_id)
    info = _wait(client, job_id, show=False, timeout_s=60)
    print(f"{job_id}: {jobs.status_name(info.status)}; finished runs stay in MLflow (submit the study again to resume)")
    return EXIT_OK
