// Runs a random model both through the tfjs forward pass (loaded from a freshly written HF folder) and the
// float64 oracle, row by row of a right-padded batch, and asserts agreement to 1e-4 on logits and every site:
// the residual stream, the block outputs, q/k/v before and after RoPE, z, the MLP's neurons, and the attention
// scores and patterns (whose masked entries, keys after the query or past the row's end, must be −1e9-ish / 0).
import * as fs from "node:fs";
import { expect } from "vitest";
import { loadModelSync } from "../src/io/model.js";
import { disposeModel, forward, type ForwardResult } from "../src/model/llama.js";
import { oracleForward, type OracleConfig, type OracleOutput } from "./oracle.js";
import { randomWeights, writeModelFolder } from "./random-model.js";
import { maxAbsDiff } from "./helpers.js";

const TOL = 1e-4;

/** Per-position sites of layer l, spelled out here rather than taken from src/model/hooks.ts. */
const positionSites = (l: number) => [
  `blocks.${l}.hook_resid_pre`,
  `blocks.${l}.attn.hook_q`,
  `blocks.${l}.attn.hook_k`,
  `blocks.${l}.attn.hook_v`,
  `blocks.${l}.attn.hook_rot_q`,
  `blocks.${l}.attn.hook_rot_k`,
  `blocks.${l}.attn.hook_z`,
  `blocks.${l}.hook_attn_out`,
  `blocks.${l}.hook_resid_mid`,
  `blocks.${l}.mlp.hook_pre`,
  `blocks.${l}.mlp.hook_pre_linear`,
  `blocks.${l}.mlp.hook_post`,
  `blocks.${l}.hook_mlp_out`,
  `blocks.${l}.hook_resid_post`,
];
const matrixSites = (l: number) => [`blocks.${l}.attn.hook_attn_scores`, `blocks.${l}.attn.hook_pattern`];

/** A row's valid positions of a [B, T, ...] site, flattened (padding positions hold no token of the row). */
const rowOf = (t: ForwardResult, name: string, b: number, n: number): number[] =>
  ((t.cache.get(name).arraySync() as unknown[][])[b]!.slice(0, n) as unknown[]).flat(3) as number[];

/** Logits and every per-position site of row b against the oracle. */
function checkPositions(run: ForwardResult, names: string[], ref: OracleOutput, b: number, n: number, what: string) {
  const logits = (run.logits!.arraySync() as number[][][])[b]!.slice(0, n).flat();
  expect(maxAbsDiff(logits, ref.logits.flat()), `logits row ${b} (${what})`).toBeLessThanOrEqual(TOL);
  for (const nm of names)
    expect(maxAbsDiff(rowOf(run, nm, b, n), ref.sites[nm]!.flat()), `${nm} row ${b} (${what})`).toBeLessThanOrEqual(
      TOL,
    );
}

/** Scores and pattern [heads, T, T] of row b: the oracle's where a query may look, masked entries elsewhere. */
function checkMatrices(run: ForwardResult, l: number, ref: OracleOutput, b: number, n: number) {
  const [sName, pName] = matrixSites(l);
  const [scores, pattern] = [sName!, pName!].map((nm) => (run.cache.get(nm).arraySync() as number[][][][])[b]!);
  const T = scores![0]!.length;
  scores!.forEach((head, h) => {
    for (let q = 0; q < n; q++)
      for (let k = 0; k < T; k++) {
        const [s, p] = [head[q]![k]!, pattern![h]![q]![k]!];
        const where = `layer ${l} row ${b} head ${h} [${q}, ${k}]`;
        if (k <= q) {
          expect(Math.abs(s - ref.matrices[sName!]![h]![q]![k]!), `scores ${where}`).toBeLessThanOrEqual(TOL);
          expect(Math.abs(p - ref.matrices[pName!]![h]![q]![k]!), `pattern ${where}`).toBeLessThanOrEqual(TOL);
        } else {
          expect(s, `masked score ${where}`).toBeLessThan(-1e8); // the score plus the −1e9 mask
          expect(p, `masked pattern ${where}`).toBe(0);
        }
      }
  });
}

/** Checks every row of a padded batch against the oracle run on that row alone. */
export function checkAgainstOracle(
  cfg: OracleConfig,
  seed: number,
  dtype: "F32" | "F16" | "BF16",
  shards: number,
  rows: number[][],
  attention: "auto" | "grouped" | "batched" = "auto",
): void {
  const w = randomWeights(cfg, seed);
  const dir = writeModelFolder({ cfg, seed, dtype, shards }, w);
  const model = loadModelSync(dir);
  const runs: ForwardResult[] = [];
  try {
    const T = Math.max(...rows.map((r) => r.length));
    const padded = rows.map((r) => [...r, ...new Array(T - r.length).fill(0)]);
    const layers = Array.from({ length: cfg.layers }, (_, l) => l);
    const names = ["hook_embed", ...layers.flatMap(positionSites)];
    const lengths = rows.map((r) => r.length);
    // watching the matrices runs a layer's attention batched; without them `attention` picks the path itself
    const all = forward(model, padded, { lengths, cache: [...names, ...layers.flatMap(matrixSites)], attention });
    runs.push(all);
    const plain = attention === "batched" ? null : forward(model, padded, { lengths, cache: names, attention });
    if (plain) runs.push(plain);
    rows.forEach((r, b) => {
      const ref = oracleForward(cfg, w, r);
      checkPositions(all, names, ref, b, r.length, "matrices watched");
      if (plain) checkPositions(plain, names, ref, b, r.length, `${attention} attention`);
      for (const l of layers) checkMatrices(all, l, ref, b, r.length);
    });
  } finally {
    for (const r of runs) r.dispose();
    disposeModel(model);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
