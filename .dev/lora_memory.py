"""Peak memory (max RSS) of PPO with full fine-tuning vs LoRA, at a chosen model size:
`python .dev/lora_memory.py [d_model n_layers]` (default 1024 24: the shape of opt-350m, random weights,
the shipped tokenizer). Each run is `util.py ppo` in its own process, measured by /usr/bin/time."""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, OPTForCausalLM  # noqa: E402

import util  # noqa: E402


def main(d_model=1024, n_layers=24):
    out = Path(tempfile.mkdtemp(prefix="lora-mem-"))
    shape = dict(d_model=d_model, n_layers=n_layers, n_heads=max(1, d_model // 64), max_positions=192)
    cfg = util.get_config("tiny", out_dir=str(out), **shape)
    tok = util.load_tokenizer(cfg.tokenizer_dir)
    torch.manual_seed(0)
    actor = OPTForCausalLM(util.tiny_opt_config(cfg, tok))
    util.save_model(actor, tok, cfg.path("actor"))
    critic = AutoModelForSequenceClassification.from_config(actor.config.__class__(**{**actor.config.to_dict(), "num_labels": 1}))
    critic.config.reward_offset = 0.0
    util.save_model(critic, tok, cfg.path("critic"))
    n_params = sum(p.numel() for p in actor.parameters())
    del actor, critic
    results = {"d_model": d_model, "n_layers": n_layers, "actor_params_M": round(n_params / 1e6, 1)}
    for lora_r in (0, 8):
        conf = out / f"lora{lora_r}.json"
        conf.write_text(json.dumps({"preset": "tiny", "out_dir": str(out), **shape, "lora_r": lora_r, "ppo_iterations": 2,
                                    "rollout_batch_size": 8, "ppo_minibatch_size": 4, "ppo_epochs": 1, "save_every": 100}))
        p = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", sys.executable, str(util.ROOT / "util.py"), "ppo",
                            "--config", str(conf)], capture_output=True, text=True, env={"TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin"})
        assert p.returncode == 0, p.stderr[-2000:]
        kb = int(next(ln for ln in p.stderr.splitlines() if ln.startswith("MAXRSS_KB")).split()[1])
        secs = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1])["seconds"]
        results[f"lora_r={lora_r}"] = {"peak_rss_GiB": round(kb / 2**20, 2), "seconds": round(secs, 1)}
        subprocess.run(["rm", "-rf", str(out / "rlhf")])
    print(json.dumps(results))


if __name__ == "__main__":
    main(*map(int, sys.argv[1:3]))
