"""``osprey-label download``: fetch the released weights and check what is on disk. Registered by
:mod:`backend.cli`; the parser is cheap to build (no torch import)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DOWNLOADABLE_MODELS = ("osprey-7b", "osprey-chat-7b", "pixelrefer-lite-2b", "pixelrefer-lite-7b", "none")


def _downloadable_sam() -> tuple[str, ...]:
    from osprey.download.sam import SAM_CHECKPOINTS  # no torch import: the parser stays cheap to build

    return (*SAM_CHECKPOINTS, "none")


def add_download_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "download",
        help="fetch the released weights (Osprey, its CLIP tower, SAM) and check them",
        description="Fetch what `osprey-label serve` loads, where it looks for it, then check every file. "
        "Osprey goes into the Hugging Face cache (HF_HOME; HF_ENDPOINT selects a mirror), SAM into "
        "--model-dir (MODEL_DIR, default ./models). Exit status: 0 all present and verified, 1 something missing "
        "or bad, 2 a fetch failed.",
    )
    parser.add_argument(
        "--model",
        choices=DOWNLOADABLE_MODELS,
        default="osprey-7b",
        help="region model checkpoint (default osprey-7b; pixelrefer-lite-2b/-7b: PixelRefer-Lite)",
    )
    parser.add_argument(
        "--sam", choices=_downloadable_sam(), default="vit_h", help="SAM checkpoint (default vit_h)"
    )
    parser.add_argument(
        "--dir",
        help="one plain folder for everything instead: SAM files in DIR, Osprey in DIR/<Osprey-7b> "
        "(then serve with MODEL_DIR=DIR OSPREY_MODEL=DIR/<Osprey-7b>)",
    )
    parser.add_argument("--model-dir", help="where the SAM files go (MODEL_DIR, default ./models)")
    parser.add_argument("--force", action="store_true", help="fetch again even when the files are present")
    parser.add_argument("--check", action="store_true", help="fetch nothing; check what is present")
    parser.add_argument(
        "--verify-hashes",
        action="store_true",
        help="also re-hash every Osprey/CLIP weight file against the sha256 the hub recorded "
        "(reads every byte; SAM files are always hashed)",
    )
    parser.add_argument(
        "--sam-base-url",
        default=None,
        help="where the SAM files are served from (SAM_BASE_URL, default Meta's download site)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_download)


def run_download(args: argparse.Namespace, *, snapshot_download=None) -> int:
    """``osprey-label download``: SAM into ``args.model_dir`` (default ./models) from ``args.sam_base_url``
    (default Meta's site; :mod:`backend.cli` fills both from MODEL_DIR and SAM_BASE_URL when the command
    line leaves them out). ``snapshot_download`` stands in for the hub's (tests)."""
    from osprey import download
    from osprey.download.hub import check_pixelrefer, fetch_pixelrefer, pixelrefer_repo
    from osprey.model.checkpoint import OSPREY_REPOS

    model = None if args.model == "none" else args.model
    pixelrefer = bool(model) and model.startswith("pixelrefer")
    repos = {m: pixelrefer_repo(m) for m in DOWNLOADABLE_MODELS if m.startswith("pixelrefer")} | OSPREY_REPOS
    fetch = fetch_pixelrefer if pixelrefer else download.fetch_osprey
    check = check_pixelrefer if pixelrefer else download.check_osprey
    sam = None if args.sam == "none" else args.sam
    folder = Path(args.dir).expanduser() if args.dir else None
    sam_dir = folder or Path(args.model_dir or "./models")
    osprey_dir = folder / repos[model].split("/")[-1] if folder and model else None
    base_url = args.sam_base_url or download.DEFAULT_SAM_BASE_URL
    errors: list[Exception] = []
    if not args.check and model:
        print(f"fetching {repos[model]} into {osprey_dir or 'the Hugging Face cache'}")
        try:
            fetch(model, local_dir=osprey_dir, force=args.force, snapshot_download=snapshot_download)
        except download.DownloadError as error:
            errors.append(error)
    if not args.check and sam:
        try:
            path, fetched = download.fetch_sam(
                sam, sam_dir, base_url=base_url, force=args.force, progress=not args.quiet
            )
            print(f"{path}: {'fetched and verified' if fetched else 'already present and verified'}")
        except download.DownloadError as error:
            errors.append(error)
    rows = []
    if model:
        rows += check(model, directory=osprey_dir, verify_hashes=args.verify_hashes)
    if sam:
        rows += download.check_sam(sam, sam_dir)
    print(download.format_table(rows))
    if errors:
        for error in errors:
            print(f"osprey-label download: error: {error}", file=sys.stderr)
        if any(isinstance(e, download.NetworkUnavailableError) for e in errors):
            print(
                download.offline_help(
                    model=None if pixelrefer else model, sam=sam, sam_dir=sam_dir, osprey_dir=osprey_dir
                ),
                file=sys.stderr,
            )
        return 2
    if any(not row.ok for row in rows):
        print("\nsome weights are missing or bad; `osprey-label download` fetches them", file=sys.stderr)
        return 1
    serve_env = []
    if model and osprey_dir:
        serve_env.append(f"{'REGION_MODEL' if pixelrefer else 'OSPREY_MODEL'}={osprey_dir}")
    elif model:
        serve_env.append(f"{'REGION_MODEL' if pixelrefer else 'OSPREY_MODEL'}={model}")
    if sam:
        serve_env += [f"SAM_MODEL={sam}", f"MODEL_DIR={sam_dir}"]
    print(f"\nall present and checked; start with: {' '.join(serve_env)} osprey-label serve")
    return 0
