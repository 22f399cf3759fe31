"""The tables of docs/reliability.md, generated from what the tests try.

``python tests/reliability_table.py`` rewrites the generated part of docs/reliability.md;
tests/test_reliability_doc.py fails when the doc and the tests disagree. Bad specs come from the
corpus files themselves (``tests/bad_specs/*.yaml``); shard attacks and infrastructure failures
are listed here, one entry per test, and the tests check that the lists match their functions.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "reliability.md"
BEGIN, END = "<!-- BEGIN GENERATED: tests/reliability_table.py -->", "<!-- END GENERATED -->"

# test function in tests/test_untrusted_shards.py -> (crafted input, outcome)
SHARD_ATTACKS = {
    "test_absolute_member_path_is_a_bad_sample_and_never_written": (
        "tar member named with an absolute path",
        "bad sample `unsafe tar member`; `data prepare` writes nothing outside its output folder",
    ),
    "test_dotdot_member_path_is_a_bad_sample_and_never_written": (
        "tar member `../../escaped-dotdot.png`",
        "bad sample `unsafe tar member: path with '..'`; nothing written outside the output folder",
    ),
    "test_symlink_member_is_never_followed": (
        "tar symlink member to `/etc/passwd`",
        "bad sample `unsafe tar member: symlink to /etc/passwd`; never followed",
    ),
    "test_hardlink_member_is_never_followed": (
        "tar hard links (to another member, to `/etc/shadow`)",
        "2 bad samples `unsafe tar member: hard link ...`; never followed",
    ),
    "test_device_and_fifo_members_are_never_opened": (
        "tar character device, block device and FIFO members",
        "3 bad samples; never opened",
    ),
    "test_decompression_bomb_in_a_tar_is_a_bad_sample": (
        "9,000 x 9,000 PNG (81 MP, a few kB) in a tar",
        "bad sample `image too large` (limit 64 MP, set on PIL explicitly)",
    ),
    "test_decompression_bomb_in_parquet_is_a_bad_sample": (
        "the same bomb in a Parquet image column",
        "bad sample `image too large`",
    ),
    "test_bomb_inside_someone_elses_prepared_dataset_is_refused_at_decode": (
        "the bomb inside a prepared dataset built elsewhere",
        "decoding refuses it: `DatasetError: ... image too large: 9000x9000 ...` (the run fails, named)",
    ),
    "test_non_image_bytes_with_an_image_extension_are_bad_samples": (
        "a shell script as `.jpg`, HTML as `.png`, a truncated PNG",
        "3 bad samples `undecodable image`",
    ),
    "test_oversized_caption_is_truncated": (
        "a 60 kB `.txt` caption",
        "caption truncated to 2,048 characters; sample kept",
    ),
    "test_oversized_parquet_caption_is_truncated": (
        "a 60 kB caption in Parquet",
        "caption truncated to 2,048 characters; sample kept",
    ),
    "test_caption_over_the_byte_limit_is_refused_unread": (
        "a 5 MB `.txt` caption; a 1 MB Parquet caption alone in its row group, and among 99 short ones",
        "bad sample `caption too large` (limit 64 KiB): the tar member from its header, unread; the one-row "
        "group from its metadata, unread; the cell among 99 once its row group is read (the other 99 kept)",
    ),
    "test_image_over_the_byte_limit_is_refused_unread": (
        "a 33 MiB image file in a folder (sparse), tar member and Parquet cell",
        "bad sample `image too large: N bytes exceeds the limit of 33554432`, from `stat`, the tar header and "
        "the row group's metadata, before any byte is read",
    ),
    "test_oversized_object_in_a_remote_image_folder_is_refused_from_the_listing": (
        "a 32 MiB + 1 byte object in an image folder on S3 (moto's server)",
        "bad sample `image too large`, from the size in the prefix's listing, before the object is read",
    ),
    "test_compressed_tar_is_refused_unless_allowed": (
        "a gzip-compressed tar (`transferlab data prepare` through the console script)",
        "bad sample `compressed tar refused: gzip; allow it with allow_compressed: true (--allow-compressed)`; "
        "exit 2, one line `no usable samples (1 bad, compressed tar refused x1; first: ...)`; with "
        "`--allow-compressed` it is prepared",
    ),
    "test_gzip_bomb_is_refused_from_its_tar_header_in_bounded_memory": (
        "a ~130 kB gzip tar holding a 128 MB caption, compressed tars allowed",
        "bad sample `caption too large`, skipped as a stream; peak memory of `prepare` grows by < 80 MB "
        "(33 MB measured)",
    ),
    "test_a_study_source_reads_a_compressed_tar_only_when_it_allows_it": (
        "a gzip tar as a study's source, without and with `allow_compressed: true`",
        "without: `no usable samples (1 bad, compressed tar refused x1; ...)`; with: scanned, and read back "
        "by training's read units (the option travels with the scan)",
    ),
    "test_byte_limits_are_overridden_by_the_environment": (
        "a 200-byte caption with `TRANSFERLAB_MAX_CAPTION_BYTES=100`; the variable set to `lots`",
        "bad sample `caption too large`; a non-integer limit stops the import with "
        "`TRANSFERLAB_MAX_CAPTION_BYTES: must be an integer number of bytes`",
    ),
    "test_oversized_pax_header_stops_the_shard_before_it_is_read": (
        "a 5 MB PAX extension header (tarfile reads these whole, before the member)",
        "refused from its size (limit 1 MiB): the rest of the shard is a bad sample `truncated or corrupt tar: "
        "extended header of N bytes exceeds ...`; the samples before it are kept, as for a cut-off tar",
    ),
    "test_images_in_formats_the_readers_do_not_read_are_bad_samples": (
        "GIF, BMP and TIFF images named `.png`",
        "3 bad samples `undecodable image: not a JPEG, PNG or WebP` (PIL opens only those formats)",
    ),
    "test_non_integer_parquet_labels_are_bad_samples": (
        "Parquet label columns of strings (`'0'`, `'seven'`) and floats (`1.5`)",
        "bad samples `unreadable label: not an integer (str)`; integral floats (`2.0`) are read as ints",
    ),
    "test_oversized_metadata_is_ignored": (
        "2 MB `.json` metadata",
        "metadata ignored (it only names classes); sample kept",
    ),
    "test_symlinked_class_folder_is_not_followed": (
        "image folder whose class folder is a symlink to elsewhere",
        "not followed: only real folders are classes",
    ),
    "test_escaping_symlink_to_a_file_in_a_folder_is_not_read": (
        "image folder with a symlink to `/etc/hostname` and a FIFO named `.png`",
        "neither is read (a FIFO would block forever)",
    ),
    "test_non_image_labels_and_keys_do_not_break_prepare": (
        "`.cls` labels `-7` and `seven`",
        "bad samples `label out of range`, `unreadable label`; the rest is prepared",
    ),
}

# (hostile path, manifest or value, test, outcome)
HOSTILE_PATHS = [
    (
        "`data prepare --out` a folder holding other files, or a file (through the console script)",
        "tests/test_data_paths.py::test_prepare_replaces_only_a_dataset_folder",
        "exit 2, one line `error: DIR: not empty and not a transferlab dataset (no manifest.json); refusing to "
        "replace it ...` / `exists and is not a folder`; nothing deleted; a folder holding a dataset is replaced",
    ),
    (
        "a manifest naming `/etc/passwd`, `../../outside.parquet` or `s3://someone-else/...` as a shard",
        "tests/test_data_paths.py::test_a_manifest_naming_files_outside_its_dataset_is_refused",
        "`DatasetError: DIR: the manifest names '/etc/passwd', outside the dataset; refusing to open it`",
    ),
    (
        "the same manifest on an object store (moto's S3 server)",
        "tests/test_data_paths.py::test_a_remote_manifest_naming_an_absolute_path_is_refused",
        "refused the same way, naming the `s3://` URI",
    ),
    (
        "`data prepare/inspect/verify` given `s3://KEY:SECRET@...` or `?endpoint_override=HOST`",
        "tests/test_data_paths.py::test_data_commands_refuse_uris_with_credentials_or_a_query_without_repeating_them",
        "exit 2, one line `error: SRC: must not carry credentials (USER:SECRET@) ...` / `--out: must not carry a "
        "query string ...`; the secret appears in no output; nothing written",
    ),
    (
        "a shard changed after `data prepare` (one byte flipped, size unchanged)",
        "tests/test_data_paths.py::test_data_verify_finds_a_shard_changed_since_prepare",
        "opening still works (it checks presence only); `transferlab data verify DIR` exits 2 with one line naming "
        "the shard whose SHA-256 differs from the manifest's",
    ),
    (
        "the same, then read (a Parquet shard's rows, a `webdataset` tar)",
        "tests/test_data_paths.py::test_a_reader_refuses_a_shard_changed_since_prepare",
        "the first read of the shard in the process hashes it: `DatasetError: SHARD: SHA-256 ... differs from the "
        "manifest's: the shard changed after `data prepare`; prepare the dataset again`; an intact shard reads as "
        "before",
    ),
    (
        "class names `=HYPERLINK(...)`, `+1+1`, `-2+3`, `@SUM(...)`, tab-`=` in a report table",
        "tests/test_report_csv.py::test_report_csv_cells_that_a_spreadsheet_would_run_are_text",
        "written to `tables/*.csv` (and `runs --csv`) prefixed with `'`, so a spreadsheet shows them as text; "
        "numbers untouched",
    ),
]

# (failure, test, outcome)
INFRASTRUCTURE = [
    (
        "MLflow server killed (SIGKILL) while a pretraining run trains, restarted on the same port and store",
        "tests/test_outages.py::test_study_survives_a_server_restart_without_losing_or_duplicating",
        "reports go to the storage spool, training goes on, calls retry with backoff; once the server is back every "
        "metric lands once (no duplicate run or step); exit 0",
    ),
    (
        "MLflow server killed and not restarted (deadline `TRANSFERLAB_TRACKING_DEADLINE_S=6`)",
        "tests/test_outages.py::test_server_down_past_the_deadline_stops_cleanly_and_resumes",
        "exit 3, last line `stopped: tracking server ... unreachable for Ns ... resume with the same command: "
        "transferlab run ...`; the same command later finishes the study with nothing lost or doubled",
    ),
    (
        "checkpoint folder of a finished pretraining run deleted, then a new transfer fit needs it",
        "tests/test_outages.py::test_a_deleted_checkpoint_fails_its_fits_by_name_and_stays_resumable",
        "those fits fail, naming the run, the missing path and how to redo it (`mlflow runs delete --run-id ID`, run "
        "again); exit 1; no run is created or changed",
    ),
    (
        "tracking URI nobody listens on (`http://user:***@127.0.0.1:9`)",
        "tests/bad_specs/tracking_uri_unreachable.yaml",
        "exit 2 before any compute: `tracking_uri: cannot reach the MLflow tracking server at http://***@127.0.0.1:9 "
        "(connection refused)`",
    ),
    (
        "read-only storage path",
        "tests/test_storage_faults.py::test_read_only_storage_is_refused_before_compute",
        "exit 2 before any compute: `--storage-path: cannot write to ... (Read-only file system)`",
    ),
    (
        "full storage path (a 16 kB tmpfs)",
        "tests/test_storage_faults.py::test_full_storage_is_refused_before_compute",
        "exit 2 before any compute: `--storage-path: cannot write to ... (No space left on device)`",
    ),
    (
        "planted `MLFLOW_TRACKING_PASSWORD`, `AWS_SECRET_ACCESS_KEY`, `RAY_AUTH_TOKEN`, token in the tracking URI",
        "tests/test_outages.py::test_planted_secrets_appear_in_no_output",
        "none in stdout/stderr, MLflow params/tags/metric names/artifacts, the server's store, checkpoint storage, "
        "Ray's logs (one known Ray exception, below) or `transferlab report` output",
    ),
    (
        "`submit` from a project holding `.env`, `.env.prod`, `.aws/`, `*.pem`, `*credentials*` and SSH key files",
        "tests/test_submit.py::test_submission_carries_what_the_cluster_needs_and_no_token",
        "none of them is uploaded (Python source is, whatever its name); `submit` prints what travels; `.env` "
        "files are in .gitignore",
    ),
    (
        "`submit` with `MLFLOW_TRACKING_PASSWORD` set, or a `user:password@` tracking URI",
        "tests/test_submit.py::test_submission_carries_what_the_cluster_needs_and_no_token",
        "neither is in the job's `env_vars` (nor is the Ray token): the cluster provides its own",
    ),
    (
        "the same through the command line, with and without `--send-credentials`",
        "tests/test_submit.py::test_submit_says_whether_it_sends_mlflow_credentials",
        "one line first: `note: MLflow credentials of this environment are not sent with the job ...` or "
        "`warning: MLflow credentials go in the job's env_vars (--send-credentials): whoever reaches ...`; the "
        "password is in neither",
    ),
    (
        "`submit --send-credentials`; a password given as a file (`MLFLOW_TRACKING_PASSWORD_FILE`)",
        "tests/test_submit.py::test_mlflow_credentials_are_sent_only_when_asked_and_files_are_read_here",
        "sent by value only when asked (with a warning), the URI's winning; this machine's file path never "
        "travels; trials get the path, and a stale variable loses to the file",
    ),
    (
        "`MLFLOW_TRACKING_PASSWORD_FILE` naming a missing, empty or 70 kB file",
        "tests/test_submit.py::test_an_unreadable_credential_file_is_one_line_naming_it",
        "exit 2, one line `error: MLFLOW_TRACKING_PASSWORD_FILE: PATH: cannot read it (...)` / `is empty` / "
        "`holds N bytes, too many for a credential`",
    ),
    (
        "planted MLflow passwords (one in a file, one in the driver's environment) in a Ray Tune phase",
        "tests/test_credential_files.py::test_trials_get_mlflow_credentials_and_no_value_reaches_storage_or_ray_logs",
        "every trial sees the password (checked by digest), the file's travelling as its path only; neither value "
        "is in any file under the storage path (Tune's `tuner.pkl`, experiment state, trial folders) or in Ray's "
        "session logs",
    ),
    (
        "any pod of the namespace connecting to the Ray head, MLflow, MinIO or PostgreSQL",
        "tests/test_deploy.py::test_network_policies_let_through_only_the_listed_connections",
        "who reaches whom, computed from the NetworkPolicies and the manifests' own pod labels, is exactly "
        "the table of docs/cluster.md: default-deny ingress; Ray pods to each other; operator pods to the head "
        "(8265, 10001); the RayJob submitter and KubeRay operator to 8265; Ray pods, operators and the ingress "
        "controller to MLflow (5000); Ray pods, MLflow and the bucket Job to MinIO (9000); MLflow to PostgreSQL "
        "(5432)",
    ),
    (
        "the KubeRay manifests' Ray pods",
        "tests/test_deploy.py::test_raycluster_head_workers_autoscaling_auth_and_shared_storage",
        "no credential variable: `MLFLOW_TRACKING_USERNAME_FILE`/`_PASSWORD_FILE` and `AWS_SHARED_CREDENTIALS_FILE` "
        "name files of the `transferlab-ray` Secret mounted read-only on every pod",
    ),
    (
        "`submit`/`status`/`logs`/`stop` with a Ray token to a job API on another machine over plain http",
        "tests/test_submit.py::test_a_token_sent_over_plain_http_to_another_machine_is_warned_about",
        "a warning naming the host and how to avoid it (https, an SSH tunnel or `kubectl port-forward`); none "
        "for https, loopback or no token; the token is never in the warning",
    ),
    (
        "chaos on a two-node cluster sharing no disk, one study of three 3-epoch pretraining runs: (1) the MLflow "
        "server SIGKILLed while the first run trains on the worker node, started again (same port and store) once a "
        "report had to be spooled",
        "tests/test_multinode.py::test_chaos_a_study_through_a_server_kill_a_full_disk_and_a_worker_kill_resumes_exactly_once",
        "the worker's reports go to the spool on the storage disk and training goes on; once the server is back the "
        "spool is sent and the job goes on; in the end every run's `train_loss` has steps 0, 1, 2 once each and a "
        "report made during the outage is among them; the spool is empty",
    ),
    (
        "(2) then the storage disk (a 128 MiB tmpfs both nodes mount) filled with one file while the second run "
        "trains, the file removed once the job ended",
        "tests/test_multinode.py::test_chaos_a_study_through_a_server_kill_a_full_disk_and_a_worker_kill_resumes_exactly_once",
        "the job ends (exit 3) with one line `stopped: storage failed: cannot write to STORAGE (No space left on "
        "device) ... resume with the same command: ...` instead of Ray Tune's traceback (Tune cannot write the trial's "
        "error file on the full disk, then fails reading it back); with the space freed the study resumes (3)",
    ),
    (
        "(3) then, the study submitted again, the worker node SIGKILLed while the last run trains, and started again",
        "tests/test_multinode.py::test_chaos_a_study_through_a_server_kill_a_full_disk_and_a_worker_kill_resumes_exactly_once",
        "that job ends (FAILED with `max_failures: 0`); submitted a third time the study SUCCEEDS with `3 pretraining "
        "runs (2 already done)`: 3 pretraining and 3 transfer runs FINISHED, one per config hash (runs lost 0, "
        "duplicated 0), the pretraining runs the same run ids as before the first fault, none RUNNING",
    ),
    (
        "a trial on a node that cannot open its data (missing, or changed since planning)",
        "tests/test_publish.py::test_a_trial_names_the_uri_and_its_node_when_its_data_is_missing_or_changed",
        "the trial fails with one line naming the URI and the node (`... (on node HOST (ADDRESS))`)",
    ),
    (
        "a second `transferlab run` of a study whose driver is alive (another terminal, a local run beside a "
        "submitted one)",
        "tests/test_driver_lease.py::test_a_second_run_is_refused_naming_the_live_driver_and_touches_nothing",
        "exit 4, one line `error: study 'S' is being run by another driver (host H, pid P, since T UTC, last "
        "heartbeat Ns ago); ...`; no run created or reopened, Ray not started",
    ),
    (
        "a driver whose heartbeat stopped (another machine, stale but not expired), then one that stays silent",
        "tests/test_driver_lease.py::test_a_silent_driver_is_waited_out_and_a_live_one_refused",
        "the new driver says it waits, takes the lease over once the heartbeat is `TRANSFERLAB_LEASE_EXPIRY_S` "
        "old (default 30 s; heartbeat every `TRANSFERLAB_LEASE_HEARTBEAT_S`, default 10 s); a live holder is refused "
        "at once",
    ),
    (
        "a driver SIGKILLed on this machine, its lease left in MLflow",
        "tests/test_driver_lease.py::test_a_killed_drivers_lease_is_taken_over_at_once",
        "the next `run` sees the holder's process is gone and takes over at once, with a `note:` naming it "
        "(`tests/test_resume_kill.py` resumes a killed study this way)",
    ),
    (
        "a driver stalled (SIGSTOP) past the lease expiry while another takes over, then resumed",
        "tests/test_driver_lease.py::test_a_driver_stalled_past_the_expiry_loses_its_lease_and_knows_it",
        "its next heartbeat finds the new holder: `error: the lease ... was taken over`; it marks no run KILLED "
        "and leaves the new holder's lease alone",
    ),
    (
        "two FINISHED runs of one config hash (left by two drivers before the lease)",
        "tests/test_driver_lease.py::test_a_job_with_two_finished_runs_counts_once_newest_wins",
        "`report`, `runs` and `run`'s table count the job once: the newest FINISHED run (latest end time) wins, "
        "transfer runs under the dropped duplicate are read under the kept one",
    ),
    (
        "two studies in different tracking stores sharing one storage path, each with spooled metrics",
        "tests/test_spool.py::test_a_study_flushes_only_its_own_spool_and_never_deletes_another_stores",
        "batches live under `_tracking_spool/STORE/EXPERIMENT/`; starting a study sends only its own; the "
        "other's (and old unscoped batches of other studies) stay untouched until their study starts",
    ),
    (
        "a spooled batch whose run the tracking store does not know",
        "tests/test_spool.py::test_a_batch_whose_run_the_store_does_not_know_is_kept",
        "kept, with a warning; never deleted",
    ),
    (
        "a torn and a garbage file in the spool",
        "tests/test_spool.py::test_a_corrupt_batch_is_quarantined_once_and_blocks_nothing",
        "each moved to `_tracking_spool/_quarantine/` with one warning; the good batches are sent; the next start "
        "says nothing",
    ),
    (
        "a process spooling batches SIGKILLed at random points of its loop, four times (seeded), each next writer "
        "going on from the last step acknowledged",
        "tests/test_spool.py::test_a_writer_killed_at_random_points_leaves_only_whole_batches_each_sent_once",
        "only whole batches carry a batch's name (a torn write is a `.tmp` file, never sent); one flush sends every "
        "acknowledged step, each once (a batch written twice across a kill is sent once); nothing quarantined",
    ),
    (
        "a power loss right after a local batch's rename",
        "tests/test_spool.py::test_a_local_batch_is_fsynced_before_its_rename_and_its_folder_after",
        "the writer's system calls, read with strace: each batch's file fsynced under its temporary name before the "
        "rename, its folder fsynced after, so the disk holds the whole batch or none (the power cut itself is not "
        "simulated: it needs a block device that drops unsynced writes)",
    ),
    (
        "a driver killed between creating a pretraining run and logging its params and class mask",
        "tests/test_record_repair.py::test_a_run_created_but_never_given_params_or_mask_is_repaired_on_reopen",
        "the next `run` reopens the same run and logs its params and mask; analysis reads its real label noise "
        "and classes, not the defaults",
    ),
    (
        "an artifact store that cannot be reached while analysis reads class masks",
        "tests/test_record_repair.py::test_an_unreachable_artifact_store_is_an_error_not_an_all_classes_mask",
        "`AnalysisError: artifacts: cannot read view/class_mask.json of the run at URI: ...`; only a missing "
        'artifact means "trained on every class"',
    ),
    (
        "the tracking server down while a new wave of trials starts (deadline 4 s)",
        "tests/test_outage_clock.py::test_a_later_wave_of_trials_does_not_wait_the_deadline_again",
        "the outage's start is shared through `STORAGE/_tracking_outage/`: the later trial gives up at once instead "
        "of waiting the deadline again; no trial, phase or search starts work past it",
    ),
    (
        "a checkpoint holding a pickled object that runs code when unpickled",
        "tests/test_untrusted_code.py::test_a_malicious_checkpoint_is_refused",
        "refused by `torch.load(weights_only=True)` (`UnpicklingError`); the payload never runs",
    ),
]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    sys.path.insert(0, str(HERE))
    from test_bad_specs import CORPUS, expectation

    lines = [
        f"### Bad study files ({len(CORPUS)} in `tests/bad_specs/`)",
        "",
        "Each runs through `transferlab validate` and `transferlab run`: exit 2, one line on stderr "
        "(`error: ` + the text below, which names the field), no traceback, no MLflow store and no storage "
        "folder created.",
        "",
        "| file | tries | error line starts with / contains |",
        "|---|---|---|",
    ]
    for path in CORPUS:
        expect, tries = expectation(path)
        lines.append(f"| `{path.name}` | {_cell(tries)} | `{_cell(expect)}` |")
    lines += [
        "",
        f"### Untrusted shards ({len(SHARD_ATTACKS)} crafted inputs, `tests/test_untrusted_shards.py`)",
        "",
        "| crafted input | outcome |",
        "|---|---|",
    ]
    lines += [f"| {_cell(a)} | {_cell(o)} |" for a, o in SHARD_ATTACKS.values()]
    lines += [
        "",
        f"### Hostile paths, manifests and report cells ({len(HOSTILE_PATHS)} cases)",
        "",
        "| input | test | outcome |",
        "|---|---|---|",
    ]
    lines += [f"| {_cell(f)} | `{t}` | {_cell(o)} |" for f, t, o in HOSTILE_PATHS]
    lines += [
        "",
        f"### Failing infrastructure ({len(INFRASTRUCTURE)} cases)",
        "",
        "| failure | test | outcome |",
        "|---|---|---|",
    ]
    lines += [f"| {_cell(f)} | `{t}` | {_cell(o)} |" for f, t, o in INFRASTRUCTURE]
    return "\n".join(lines) + "\n"


def generated_part(text: str) -> str:
    return text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip("\n") + "\n"


def write() -> None:
    text = DOC.read_text()
    DOC.write_text(text[: text.index(BEGIN) + len(BEGIN)] + "\n" + render() + text[text.index(END) :])


if __name__ == "__main__":
    write()
    print(f"wrote {DOC}")
