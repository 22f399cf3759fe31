"""``data prepare``, ``data inspect`` and ``data overlap``: datasets converted, described and
compared, outside any study."""

from __future__ import annotations

import json
import sys

from datasets_ import DatasetError, resolve_dataset
from datasets_.overlap import find_overlap
from datasets_.prepare import inspect, prepare
from datasets_.shards import open_dataset, verify
from orchestrator.cli.exits import EXIT_OK, error
from orchestrator.spec.fields import SpecError, data_uri


def run(args) -> int:
    """``data prepare``, ``data inspect`` or ``data overlap``."""
    for flag, attr in (("SRC", "src"), ("--out", "out"), ("DIR_OR_URI", "uri"), ("A", "a"), ("B", "b")):
        value = getattr(args, attr, None)
        try:
            if value is not None:
                data_uri(flag, value)  # no ?endpoint_override= nor USER:SECRET@, as in a study file
        except SpecError as e:
            return error(str(e))
    try:
        if args.data_command == "overlap":
            return _overlap(args)
        if args.data_command == "verify":
            return _verify(args)
        columns = {
            "image_column": args.image_column,
            "label_column": args.label_column,
            "caption_column": args.caption_column,
            "key_column": args.key_column,
            **({"allow_compressed": True} if args.allow_compressed else {}),
        }
        if args.data_command == "prepare":
            if args.shard_size < 1:
                return error(f"--shard-size: must be >= 1, got {args.shard_size}")
            if not 0.0 <= args.test_fraction < 1.0:
                return error(f"--test-fraction: must be in [0, 1), got {args.test_fraction}")
            ds, bad = prepare(
                args.src, args.out, args.shard_size, args.test_fraction, args.on_bad_sample, args.format, **columns
            )
            m = ds.manifest
            print(
                f"prepared {args.out}: {m['num_samples']} samples, {m['num_classes']} classes, "
                f"{len(m['shards'])} shards, fingerprint {m['fingerprint']}"
            )
            if bad.total:
                print(
                    f"skipped {bad.total} bad sample(s): " + ", ".join(f"{k} x{v}" for k, v in bad.counts.items()),
                    file=sys.stderr,
                )
            return EXIT_OK
        m = inspect(args.uri, **columns)
    except DatasetError as e:
        return error(str(e))
    if args.json:
        print(json.dumps(m, indent=1))
        return EXIT_OK
    splits = m["splits"]
    split_text = ", ".join(f"{k} {v['num_samples'] if isinstance(v, dict) else v}" for k, v in splits.items())
    print(
        f"{m['name']}: {m['num_samples']} samples ({split_text}), {m['num_classes']} classes, fingerprint "
        f"{m['fingerprint']}"
    )
    if m["classes"]:
        shown = ", ".join(m["classes"][:20]) + (" ..." if len(m["classes"]) > 20 else "")
        print(f"classes: {shown}")
    bad = m.get("bad_samples", {}).get("total", 0)
    if bad:
        print(f"bad samples: {bad} ({m['bad_samples']['by_reason']})")
    return EXIT_OK


def _overlap(args) -> int:
    if not 0 <= args.max_distance <= 64:
        return error(f"--max-distance: must be in 0..64, got {args.max_distance}")
    report = find_overlap(resolve_dataset(args.a), resolve_dataset(args.b), max_distance=args.max_distance)
    if args.json:
        print(json.dumps(report, indent=1))
        return EXIT_OK
    print(
        f"{report['a']} vs {report['b']}: {report['exact']} exact and {report['near']} near-duplicate pair(s) "
        f"({report['candidates']} dHash candidates within {report['max_distance']} bits, confirmed on thumbnails)"
    )
    for p in report["pairs"][:20]:
        print(f"  {p['kind']:<5} d={p['distance']:<2} {p['a_split']}/{p['a_key']}  ~  {p['b_split']}/{p['b_key']}")
    if len(report["pairs"]) > 20:
        print(f"  ... {len(report['pairs']) - 20} more (--json lists all)")
    return EXIT_OK


def _verify(args) -> int:
    checked, problems = verify(open_dataset(args.uri))
    if problems:
        more = (
            f" (and {len(problems) - 1} more of {checked} shards)" if len(problems) > 1 else f" (of {checked} shards)"
        )
        return error(f"{args.uri}: shard {problems[0]}{more}")
    print(f"ok: {checked} shard(s) of {args.uri} match the SHA-256 of their manifest")
    return EXIT_OK
