"""A finished model/ in one file, for a room that skips ahead: the base model, the SFT actor and the
reward model packed with a manifest (the tokenizer's and the files' sha256, the Config fields that
shape a model), and unpacked only where that manifest matches. util re-exports these names."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

from .checks import DataError

if TYPE_CHECKING:
    from .config import Config

# the folders a room needs to start at 3_rlhf (critic_2/ ... when rm_ensemble > 1 made them)
PACKED = ("base_actor", "actor", "critic")
# the fields that decide what a model is: another value and the archive's models do not fit
SHAPE_FIELDS = ("preset", "d_model", "n_layers", "n_heads", "max_positions", "actor_hub",
                "critic_hub", "max_prompt_tokens", "max_response_tokens")
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tokenizer_digest(cfg: Config) -> str:
    """sha256 of the tokenizer the code uses (tokenizer_dir/tokenizer.json)."""
    path = Path(cfg.tokenizer_dir, "tokenizer.json")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no tokenizer (Config.tokenizer_dir)")
    return _sha256(path)


def pack_models(cfg: Config, archive=None) -> Path:
    """out_dir's base_actor/, actor/, critic/ (and critic_2/ ...) into one .tar.gz with a manifest;
    returns its path (default <out_dir>/tiny-rlhf-<preset>-models.tar.gz)."""
    out = Path(cfg.out_dir)
    folders = [d for d in PACKED if (out / d / "config.json").exists()]
    folders += sorted(p.name for p in out.glob("critic_*") if (p / "config.json").exists())
    missing = [d for d in ("actor", "critic") if d not in folders]
    if missing:
        raise FileNotFoundError(f"{out}: no {', '.join(missing)}/ to pack (run 1_actor and "
                                "2_critic first)")
    files = sorted(p for d in folders for p in (out / d).rglob("*") if p.is_file())
    manifest = {"tokenizer_sha256": tokenizer_digest(cfg),
                "config": {f: getattr(cfg, f) for f in SHAPE_FIELDS},
                "files": {str(p.relative_to(out)): _sha256(p) for p in files}}
    archive = Path(archive or out / f"tiny-rlhf-{cfg.preset}-models.tar.gz")
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        data = json.dumps(manifest, indent=1).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for p in files:
            tar.add(p, arcname=str(p.relative_to(out)))
    tmp.replace(archive)                    # atomic: a cut pack leaves no half archive
    return archive


def read_manifest(archive) -> dict:
    """The manifest of a packed archive; a file that is not one is an error naming it."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            return json.load(tar.extractfile(MANIFEST))
    except (tarfile.TarError, KeyError, OSError, json.JSONDecodeError) as e:
        raise DataError(f"{archive}: not a tiny-rlhf model archive ({e})") from None


def check_archive(archive, cfg: Config) -> dict:
    """Its manifest, if its models fit this code: the same tokenizer and the same shaping fields;
    else a DataError that names what differs."""
    manifest = read_manifest(archive)
    problems = []
    if manifest["tokenizer_sha256"] != tokenizer_digest(cfg):
        problems.append(f"its tokenizer is not this code's {cfg.tokenizer_dir}/tokenizer.json")
    ours = {f: getattr(cfg, f) for f in SHAPE_FIELDS}
    problems += [f"Config.{f}: archive {v!r}, here {ours.get(f)!r}"
                 for f, v in manifest["config"].items() if ours.get(f) != v]
    if problems:
        raise DataError(f"{archive}: its models do not fit this code: " + "; ".join(problems))
    return manifest


def unpack_models(archive, cfg: Config) -> list[str]:
    """The archive's folders into out_dir, checked first (check_archive) and after (every file's
    sha256); an existing folder is not overwritten. Returns the folders unpacked."""
    manifest = check_archive(archive, cfg)
    out = Path(cfg.out_dir)
    folders = sorted({Path(f).parts[0] for f in manifest["files"]})
    there = [d for d in folders if (out / d).exists()]
    if there:
        raise FileExistsError(f"{out}: {', '.join(there)} already there: move them away (or use "
                              "another out_dir) to unpack")
    tmp = out / ".unpack.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            names = [m for m in tar.getmembers() if m.name != MANIFEST]
            # only the files the manifest lists, as plain files under their folders ("data":
            # no absolute paths, no .., no links out of the folder)
            stray = [m.name for m in names if m.name not in manifest["files"] or not m.isfile()]
            if stray:
                raise DataError(f"{archive}: members not in its manifest: {stray[:3]}")
            tar.extractall(tmp, members=names, filter="data")
        bad = [f for f, h in manifest["files"].items() if _sha256(tmp / f) != h]
        if bad:
            raise DataError(f"{archive}: files that do not match their sha256: {bad[:3]}")
        for d in folders:
            (tmp / d).replace(out / d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folders

