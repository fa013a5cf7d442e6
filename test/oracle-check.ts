// Runs a random model both through the tfjs forward pass (loaded from a freshly written HF folder) and the
// float64 oracle, row by row of a right-padded batch, and asserts agreement to 1e-4 on logits and every site.
import * as fs from "node:fs";
import { expect } from "vitest";
import { loadModelSync } from "../src/io/model.js";
import { disposeModel, forward } from "../src/model/llama.js";
import { oracleForward, type OracleConfig } from "./oracle.js";
import { randomWeights, writeModelFolder } from "./random-model.js";
import { flat, maxAbsDiff } from "./helpers.js";

const TOL = 1e-4;

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
  try {
    const T = Math.max(...rows.map((r) => r.length));
    const padded = rows.map((r) => [...r, ...new Array(T - r.length).fill(0)]);
    const sites = (l: number) => [
      `blocks.${l}.hook_resid_pre`,
      `blocks.${l}.hook_attn_out`,
      `blocks.${l}.hook_resid_mid`,
      `blocks.${l}.hook_mlp_out`,
      `blocks.${l}.hook_resid_post`,
    ];
    const names = ["hook_embed", ...Array.from({ length: cfg.layers }, (_, l) => sites(l)).flat()];
    const { logits, cache } = forward(model, padded, { lengths: rows.map((r) => r.length), cache: names, attention });
    const lg = logits!.arraySync() as number[][][];
    rows.forEach((r, b) => {
      const ref = oracleForward(cfg, w, r);
      const got = lg[b]!.slice(0, r.length);
      expect(maxAbsDiff(flat(got), flat(ref.logits)), `logits row ${b}`).toBeLessThanOrEqual(TOL);
      for (const n of names) {
        const g = (cache.get(n).arraySync() as number[][][])[b]!.slice(0, r.length);
        expect(maxAbsDiff(flat(g), flat(ref.sites[n]!)), `${n} row ${b}`).toBeLessThanOrEqual(TOL);
      }
    });
    logits!.dispose();
    cache.dispose();
  } finally {
    disposeModel(model);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
