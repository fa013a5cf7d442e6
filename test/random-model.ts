// Random small Llama models for property tests: a fast-check arbitrary for configs, weights whose values are
// exact in F16, BF16 and F32 (multiples of 2^-7 of small magnitude), and a writer for an HF-layout folder.
import * as fs from "node:fs";
import * as path from "node:path";
import fc from "fast-check";
import { writeSafetensors, type DType } from "../src/io/safetensors.js";
import { seededRandom } from "../src/stats/stats.js";
import type { OracleConfig, Weights } from "./oracle.js";
import { tempDir } from "./tempdirs.js";

export interface RandomModelSpec {
  cfg: OracleConfig;
  seed: number;
  dtype: Extract<DType, "F32" | "F16" | "BF16">;
  shards: number; // 1 = model.safetensors; more = index + shards
}

export const arbConfig: fc.Arbitrary<OracleConfig> = fc
  .record({
    kvHeads: fc.integer({ min: 1, max: 3 }),
    group: fc.integer({ min: 1, max: 3 }),
    halfHeadDim: fc.integer({ min: 1, max: 5 }),
    hidden: fc.integer({ min: 4, max: 40 }),
    inter: fc.integer({ min: 3, max: 48 }),
    layers: fc.integer({ min: 1, max: 3 }),
    vocab: fc.integer({ min: 8, max: 64 }),
    eps: fc.constantFrom(1e-5, 1e-6),
    theta: fc.constantFrom(10000, 500000, 37.5),
    rope: fc.oneof(
      fc.constant({ kind: "default" as const }),
      fc.record({ kind: fc.constant("linear" as const), factor: fc.constantFrom(2, 4, 8) }),
      fc.record({
        kind: fc.constant("llama3" as const),
        factor: fc.constantFrom(8, 32),
        low: fc.constant(1),
        high: fc.constantFrom(2, 4),
        orig: fc.constantFrom(4, 8, 16),
      }),
    ),
    tied: fc.boolean(),
    attnBias: fc.boolean(),
    mlpBias: fc.boolean(),
  })
  .map((r) => ({
    hidden: r.hidden,
    inter: r.inter,
    layers: r.layers,
    heads: r.kvHeads * r.group,
    kvHeads: r.kvHeads,
    headDim: 2 * r.halfHeadDim,
    vocab: r.vocab,
    eps: r.eps,
    theta: r.theta,
    rope: r.rope,
    tied: r.tied,
    attnBias: r.attnBias,
    mlpBias: r.mlpBias,
  }));

/** Deterministic PRNG shared with the analysis code (mulberry32). */
export const rng = seededRandom;

/** HF tensor names and shapes for a config (written here independently of src/io/model.ts). */
export function shapesOf(c: OracleConfig): Record<string, number[]> {
  const s: Record<string, number[]> = {
    "model.embed_tokens.weight": [c.vocab, c.hidden],
    "model.norm.weight": [c.hidden],
  };
  if (!c.tied) s["lm_head.weight"] = [c.vocab, c.hidden];
  for (let l = 0; l < c.layers; l++) {
    const p = `model.layers.${l}.`;
    s[p + "input_layernorm.weight"] = [c.hidden];
    s[p + "post_attention_layernorm.weight"] = [c.hidden];
    s[p + "self_attn.q_proj.weight"] = [c.heads * c.headDim, c.hidden];
    s[p + "self_attn.k_proj.weight"] = [c.kvHeads * c.headDim, c.hidden];
    s[p + "self_attn.v_proj.weight"] = [c.kvHeads * c.headDim, c.hidden];
    s[p + "self_attn.o_proj.weight"] = [c.hidden, c.heads * c.headDim];
    s[p + "mlp.gate_proj.weight"] = [c.inter, c.hidden];
    s[p + "mlp.up_proj.weight"] = [c.inter, c.hidden];
    s[p + "mlp.down_proj.weight"] = [c.hidden, c.inter];
    if (c.attnBias) {
      s[p + "self_attn.q_proj.bias"] = [c.heads * c.headDim];
      s[p + "self_attn.k_proj.bias"] = [c.kvHeads * c.headDim];
      s[p + "self_attn.v_proj.bias"] = [c.kvHeads * c.headDim];
      s[p + "self_attn.o_proj.bias"] = [c.hidden];
    }
    if (c.mlpBias) {
      s[p + "mlp.gate_proj.bias"] = [c.inter];
      s[p + "mlp.up_proj.bias"] = [c.inter];
      s[p + "mlp.down_proj.bias"] = [c.hidden];
    }
  }
  return s;
}

/** Random weights: norms near 1, everything else k/128 with |k| ≤ 40 (exact in F16 and BF16). */
export function randomWeights(c: OracleConfig, seed: number): Weights {
  const r = rng(seed);
  const w: Weights = {};
  for (const [name, shape] of Object.entries(shapesOf(c))) {
    const n = shape.reduce((a, b) => a * b, 1);
    const isNorm = name.endsWith("norm.weight");
    const scale = name.includes("embed") || name.includes("lm_head") ? 40 : 20;
    w[name] = Float64Array.from({ length: n }, () =>
      isNorm ? 1 + Math.round((r() - 0.5) * 40) / 128 : Math.round((r() - 0.5) * 2 * scale) / 128,
    );
  }
  return w;
}

/** Writes an HF folder (config.json + one or several safetensors shards) and returns its path. */
export function writeModelFolder(spec: RandomModelSpec, w: Weights, dir = tempDir("rand")): string {
  const c = spec.cfg;
  const rope =
    c.rope.kind === "default"
      ? null
      : c.rope.kind === "linear"
        ? { type: "linear", factor: c.rope.factor }
        : {
            rope_type: "llama3",
            factor: c.rope.factor,
            low_freq_factor: c.rope.low,
            high_freq_factor: c.rope.high,
            original_max_position_embeddings: c.rope.orig,
          };
  const config = {
    architectures: ["LlamaForCausalLM"],
    model_type: "llama",
    hidden_size: c.hidden,
    intermediate_size: c.inter,
    num_hidden_layers: c.layers,
    num_attention_heads: c.heads,
    num_key_value_heads: c.kvHeads,
    head_dim: c.headDim,
    vocab_size: c.vocab,
    rms_norm_eps: c.eps,
    rope_theta: c.theta,
    rope_scaling: rope,
    tie_word_embeddings: c.tied,
    attention_bias: c.attnBias,
    mlp_bias: c.mlpBias,
    max_position_embeddings: 4096,
    hidden_act: "silu",
    bos_token_id: 1,
    eos_token_id: 2,
  };
  fs.writeFileSync(path.join(dir, "config.json"), JSON.stringify(config));
  const shapes = shapesOf(c);
  const names = Object.keys(shapes);
  const groups: string[][] = Array.from({ length: spec.shards }, () => []);
  names.forEach((n, i) => groups[i % spec.shards]!.push(n));
  const tensorsOf = (g: string[]) =>
    Object.fromEntries(g.map((n) => [n, { dtype: spec.dtype, shape: shapes[n]!, data: w[n]! }]));
  if (spec.shards === 1) writeSafetensors(path.join(dir, "model.safetensors"), tensorsOf(names));
  else {
    const weightMap: Record<string, string> = {};
    groups.forEach((g, i) => {
      const file = `model-${String(i + 1).padStart(5, "0")}-of-${String(spec.shards).padStart(5, "0")}.safetensors`;
      writeSafetensors(path.join(dir, file), tensorsOf(g));
      for (const n of g) weightMap[n] = file;
    });
    fs.writeFileSync(
      path.join(dir, "model.safetensors.index.json"),
      JSON.stringify({ metadata: {}, weight_map: weightMap }),
    );
  }
  return dir;
}

/** A random config with a seed, a storage dtype, a shard count and 1–3 rows of 1–20 token ids. */
export const arbCase = arbConfig.chain((cfg) =>
  fc.record({
    cfg: fc.constant(cfg),
    seed: fc.integer({ min: 1, max: 2 ** 30 }),
    dtype: fc.constantFrom("F32" as const, "F16" as const, "BF16" as const),
    shards: fc.integer({ min: 1, max: 3 }),
    rows: fc.array(fc.array(fc.integer({ min: 0, max: cfg.vocab - 1 }), { minLength: 1, maxLength: 20 }), {
      minLength: 1,
      maxLength: 3,
    }),
  }),
);
