// Writes a random model with Llama-3.2-1B's exact config (tied embeddings, llama3 RoPE factor 32, original
// context 8192, theta 5e5) but only `layers` layers, in BF16, and a "tuned" copy that differs in the middle
// layer's MLP: for measuring load, memory and speed at the paper's width without any download.
//   npx tsx scripts/make-1b-shaped.ts OUT_DIR [layers]   → OUT_DIR/base, OUT_DIR/tuned
import * as fs from "node:fs";
import * as path from "node:path";
import { writeSafetensors, type TensorToWrite } from "../src/io/safetensors.js";
import { configToJson, parseConfig } from "../src/model/config.js";
import { expectedTensors } from "../src/model/weights.js";
import { seededRandom } from "../src/stats/stats.js";

const out = process.argv[2];
if (!out) throw new Error("usage: make-1b-shaped.ts OUT_DIR [layers]");
const layers = Number(process.argv[3] ?? 16);
const cfg = parseConfig({
  hidden_size: 2048, intermediate_size: 8192, num_hidden_layers: layers, num_attention_heads: 32, num_key_value_heads: 8,
  head_dim: 64, vocab_size: 128256, rms_norm_eps: 1e-5, rope_theta: 500000, max_position_embeddings: 131072,
  rope_scaling: { rope_type: "llama3", factor: 32, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 },
  tie_word_embeddings: true, bos_token_id: 128000, eos_token_id: 128001,
});
const mid = Math.floor(layers / 2);
for (const which of ["base", "tuned"] as const) {
  const rand = seededRandom(7);
  const tensors: Record<string, TensorToWrite> = {};
  for (const [name, shape] of expectedTensors(cfg)) {
    const n = shape.reduce((a, b) => a * b, 1);
    const norm = name.endsWith("layernorm.weight") || name === "model.norm.weight";
    const scale = norm ? 0 : 1 / Math.sqrt(shape[shape.length - 1]!);
    const data = new Float32Array(n);
    for (let i = 0; i < n; i++) data[i] = norm ? 1 : scale * (rand() * 2 - 1) * 1.7;
    if (which === "tuned" && name === `model.layers.${mid}.mlp.down_proj.weight`) for (let i = 0; i < n; i += 97) data[i]! += 0.05;
    tensors[name] = { dtype: "BF16", shape, data };
  }
  const dir = path.join(out, which);
  fs.mkdirSync(dir, { recursive: true });
  writeSafetensors(path.join(dir, "model.safetensors"), tensors, { format: "pt" });
  fs.writeFileSync(path.join(dir, "config.json"), JSON.stringify(configToJson(cfg, "bfloat16"), null, 2) + "\n");
  console.log(`wrote ${dir}`);
}
