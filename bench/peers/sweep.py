#!/usr/bin/env python3
"""PyTorch peer for bench/1b.ts: the layer-wide resid_post patch sweep as TransformerLens users write it.

For each pair (token ids from a prefprobe pairs.jsonl), both responses in one batch of two rows:
one clean base forward, one tuned forward caching every blocks.l.hook_resid_post, then for every layer l one
full base forward from the embedding with resid_post[l] replaced by the tuned model's, full logits at every
position (what run_with_hooks does). Prints one JSON line per pair: seconds and the margins, so the bench can
compare them with prefprobe's. The Llama forward here is written from the architecture's definition, apart from
prefprobe's TypeScript one.

  python3 bench/peers/sweep.py BASE_DIR TUNED_DIR PAIRS_JSONL [--count N] [--threads T] [--resume-style]
--resume-style starts each patched forward at layer l+1 from the cached base stream (prefprobe's prefix reuse).
"""
import argparse
import json
import math
import os
import struct
import time

import torch


def read_safetensors(path):
    """name -> float32 tensor, for BF16/F16/F32 files."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        a, b = e["data_offsets"]
        t = torch.frombuffer(bytearray(data[a:b]), dtype=dtypes[e["dtype"]]) if b > a else torch.zeros(0)
        out[name] = t.reshape(e["shape"]).float()
    return out


def load(folder):
    cfg = json.load(open(os.path.join(folder, "config.json")))
    index = os.path.join(folder, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    w = {}
    for f in files:
        w.update(read_safetensors(os.path.join(folder, f)))
    if "lm_head.weight" not in w:
        w["lm_head.weight"] = w["model.embed_tokens.weight"]
    return cfg, w


def rope_inv_freq(cfg):
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    inv = 1.0 / (cfg.get("rope_theta", 10000.0) ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    rs = cfg.get("rope_scaling") or {}
    if rs.get("rope_type", rs.get("type")) == "llama3":
        factor, lo, hi, orig = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (orig / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > orig / lo, inv / factor, inv)
        mid = (wavelen <= orig / lo) & (wavelen >= orig / hi)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv


class Llama:
    def __init__(self, folder):
        self.cfg, self.w = load(folder)
        c = self.cfg
        self.L, self.nh, self.nkv = c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"]
        self.d = c.get("head_dim") or c["hidden_size"] // self.nh
        self.eps = c["rms_norm_eps"]
        self.inv_freq = rope_inv_freq(c)

    def norm(self, x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.w[name]

    def rope(self, x, T):
        ang = torch.outer(torch.arange(T, dtype=torch.float64), self.inv_freq)
        cos, sin = torch.cat([ang.cos()] * 2, -1).float(), torch.cat([ang.sin()] * 2, -1).float()
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rot * sin

    def block(self, x, l):
        p = f"model.layers.{l}."
        B, T, _ = x.shape
        h = self.norm(x, p + "input_layernorm.weight")
        q = (h @ self.w[p + "self_attn.q_proj.weight"].T).view(B, T, self.nh, self.d).transpose(1, 2)
        k = (h @ self.w[p + "self_attn.k_proj.weight"].T).view(B, T, self.nkv, self.d).transpose(1, 2)
        v = (h @ self.w[p + "self_attn.v_proj.weight"].T).view(B, T, self.nkv, self.d).transpose(1, 2)
        q, k = self.rope(q, T), self.rope(k, T)
        rep = self.nh // self.nkv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(self.d)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        z = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, self.nh * self.d)
        x = x + z @ self.w[p + "self_attn.o_proj.weight"].T
        h = self.norm(x, p + "post_attention_layernorm.weight")
        g = torch.nn.functional.silu(h @ self.w[p + "mlp.gate_proj.weight"].T) * (h @ self.w[p + "mlp.up_proj.weight"].T)
        return x + g @ self.w[p + "mlp.down_proj.weight"].T

    def run(self, ids, start=0, x=None, replace=None, cache=None):
        """Blocks start..L-1 from embeddings (or from x); replace={l: tensor} swaps resid_post[l]; returns logits."""
        if x is None:
            x = self.w["model.embed_tokens.weight"][ids]
        for l in range(start, self.L):
            x = self.block(x, l)
            if replace is not None and l in replace:
                x = replace[l]
            if cache is not None:
                cache.append(x)
        return self.norm(x, "model.norm.weight") @ self.w["lm_head.weight"].T


def margins(logits, rows, n_prompt):
    """log p(chosen) - log p(rejected): sums of response-token log-probabilities."""
    lp = logits.log_softmax(-1)
    s = [sum(lp[r, t - 1, row[t]].item() for t in range(n_prompt, len(row))) for r, row in enumerate(rows)]
    return s[0] - s[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("tuned")
    ap.add_argument("pairs")
    ap.add_argument("--count", type=int, default=1, help="pairs to sweep")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--resume-style", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    base, tuned = Llama(a.base), Llama(a.tuned)
    print(json.dumps({"load_s": time.time() - t0, "threads": torch.get_num_threads()}), flush=True)
    with open(a.pairs) as f, torch.inference_mode():
        for line in list(f)[: a.count]:
            ids = json.loads(line)["ids"]
            rows = [ids["prompt"] + ids["chosen"], ids["prompt"] + ids["rejected"]]
            T = max(map(len, rows))
            batch = torch.tensor([r + [0] * (T - len(r)) for r in rows])  # right padding: causal rows never see it
            t1 = time.time()
            tuned_cache, base_cache = [], []
            m_tuned = margins(tuned.run(batch, cache=tuned_cache), rows, len(ids["prompt"]))
            m_base = margins(base.run(batch, cache=base_cache), rows, len(ids["prompt"]))
            patched = []
            for l in range(base.L):
                if a.resume_style:
                    logits = base.run(batch, start=l + 1, x=tuned_cache[l])
                else:
                    logits = base.run(batch, replace={l: tuned_cache[l]})
                patched.append(margins(logits, rows, len(ids["prompt"])))
            print(json.dumps({"seconds": time.time() - t1, "tokens": T, "base": m_base, "tuned": m_tuned, "patched": patched}), flush=True)


if __name__ == "__main__":
    main()
