"""python util.py pack / unpack: a finished SFT and reward model handed to a room, byte for byte,
refused where it does not fit this code, and PPO (3_rlhf's loop) runs from what was unpacked."""
import dataclasses
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import util

ROOT = Path(__file__).resolve().parents[1]


def _digests(out: Path) -> dict:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in ("actor", "critic") for p in sorted((out / d).rglob("*")) if p.is_file()}


def test_pack_then_unpack_gives_the_same_files_and_ppo_runs_from_them(micro_dirs, tmp_path, rows):
    archive = util.pack_models(micro_dirs, tmp_path / "room.tar.gz")
    fresh = dataclasses.replace(micro_dirs, out_dir=str(tmp_path / "student"))
    assert util.unpack_models(archive, fresh) == ["actor", "critic"]
    assert _digests(Path(fresh.out_dir)) == _digests(Path(micro_dirs.out_dir))
    assert len(_digests(Path(fresh.out_dir))) >= 6         # weights, configs, tokenizer files
    history = util.train_ppo(fresh, "cpu", rows=rows, stop_after=1)
    assert len(history) == 1 and (Path(fresh.out_dir) / "rlhf").is_dir()
    with pytest.raises(FileExistsError, match="actor, critic already there"):
        util.unpack_models(archive, fresh)                   # nothing of a student's is overwritten


def test_an_archive_that_does_not_fit_is_refused_saying_why(micro_dirs, tmp_path):
    archive = util.pack_models(micro_dirs, tmp_path / "room.tar.gz")
    other = dataclasses.replace(micro_dirs, out_dir=str(tmp_path / "a"), d_model=64)
    with pytest.raises(util.DataError, match="Config.d_model: archive 32, here 64"):
        util.unpack_models(archive, other)
    tok_dir = tmp_path / "tok"
    shutil.copytree(micro_dirs.tokenizer_dir, tok_dir)
    text = json.loads((tok_dir / "tokenizer.json").read_text())
    text["added_tokens"] = text.get("added_tokens", [])[:-1]      # another tokenizer
    (tok_dir / "tokenizer.json").write_text(json.dumps(text))
    with pytest.raises(util.DataError, match="its tokenizer is not this code's"):
        util.unpack_models(archive, dataclasses.replace(micro_dirs, out_dir=str(tmp_path / "b"),
                                                        tokenizer_dir=str(tok_dir)))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b" / "actor").exists()


def _tampered(archive, bad, evil: bool):
    """A copy of the archive with actor/config.json changed, and a member outside it if evil."""
    with tarfile.open(archive) as src, tarfile.open(bad, "w:gz") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name == "actor/config.json":
                data = data.replace(b'"num_hidden_layers": 1', b'"num_hidden_layers": 2')
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
        if evil:
            info = tarfile.TarInfo("../evil.txt")
            info.size = 4
            dst.addfile(info, io.BytesIO(b"evil"))
    return bad


def test_a_tampered_archive_is_refused(micro_dirs, tmp_path):
    archive = util.pack_models(micro_dirs, tmp_path / "room.tar.gz")
    out = dataclasses.replace(micro_dirs, out_dir=str(tmp_path / "c"))
    with pytest.raises(util.DataError, match="members not in its manifest: \\['../evil.txt'\\]"):
        util.unpack_models(_tampered(archive, tmp_path / "evil.tar.gz", True), out)
    with pytest.raises(util.DataError, match=r"match their sha256: \['actor/config.json'\]"):
        util.unpack_models(_tampered(archive, tmp_path / "bad.tar.gz", False), out)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "c" / "actor").exists()
    with pytest.raises(util.DataError, match="not a tiny-rlhf model archive"):
        util.unpack_models(micro_dirs.path("actor", "config.json"), out)


def test_pack_and_unpack_from_the_command_line(micro_dirs, tmp_path):
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"preset": "smoke", "out_dir": micro_dirs.out_dir}))
    env_run = dict(cwd=ROOT, capture_output=True, text=True, timeout=300)
    p = subprocess.run([sys.executable, "util.py", "pack", str(tmp_path / "r.tar.gz"), "--config",
                        str(conf)], **env_run)
    assert p.returncode == 0 and "wrote" in p.stdout, p.stderr[-2000:]
    conf.write_text(json.dumps({"preset": "smoke", "out_dir": str(tmp_path / "s")}))
    p = subprocess.run([sys.executable, "util.py", "unpack", str(tmp_path / "r.tar.gz"),
                        "--config", str(conf)], **env_run)
    assert p.returncode == 0 and "start at 3_rlhf.ipynb" in p.stdout, p.stderr[-2000:]
    p = subprocess.run([sys.executable, "util.py", "unpack", "--config", str(conf)], **env_run)
    assert p.returncode == 2 and "unpack needs the archive" in p.stderr
