"""``osprey-label download --model pixelrefer-lite-2b``: fetches what loading reads, ``--check`` checks it,
and the folder loads strictly (random weights in the released layout stand in for the hub's files)."""

from __future__ import annotations

import argparse
import fnmatch
import shutil

from osprey.download.cli import run_download
from osprey.inference.pixelrefer import PixelReferLite
from osprey.inference.region_model import load_region_model
from osprey.pixelrefer.loading import save_released_layout


def test_download_then_check_then_load(tmp_path, capsys):
    tiny = PixelReferLite.from_pretrained("pixelrefer-lite-tiny", device="cpu")
    hub = save_released_layout(tiny.model, tiny.tokenizer, tmp_path / "hub")
    asked = []

    def snapshot_download(repo, *, allow_patterns, force_download, local_dir):
        asked.append((repo, tuple(allow_patterns)))
        for path in hub.iterdir():
            if any(fnmatch.fnmatch(path.name, pattern) for pattern in allow_patterns):
                shutil.copy(path, local_dir)
        return local_dir

    def args(**kw):
        base = dict(model="pixelrefer-lite-2b", sam="none", dir=str(tmp_path / "models"), force=False, check=False,
                    verify_hashes=False, sam_base_url=None, quiet=True)  # fmt: skip
        return argparse.Namespace(**{**base, **kw})

    (tmp_path / "models" / "PixelRefer-Lite-2B").mkdir(parents=True)
    assert run_download(args(), snapshot_download=snapshot_download) == 0
    assert asked[0][0] == "Alibaba-DAMO-Academy/PixelRefer-Lite-2B" and "pytorch_model.bin" in asked[-1][1]
    out = capsys.readouterr().out
    assert "REGION_MODEL=" in out and "PixelRefer-Lite-2B/pytorch_model.bin" in out
    assert run_download(args(check=True)) == 0
    folder = tmp_path / "models" / "PixelRefer-Lite-2B"
    assert isinstance(load_region_model(str(folder), device="cpu"), PixelReferLite)
    (folder / "pytorch_model.bin").unlink()
    assert run_download(args(check=True)) == 1
