// Planted localization with real training, for every layer K: DPO-tune stories260k with a rank-1 update of
// layers.K.mlp.down_proj only, then run the analysis on held-out pairs. Prints a markdown table (in the README).
// Run: npx tsx scripts/planted-localization.ts [trainPairs] [testPairs]
import * as tf from "@tensorflow/tfjs-core";
import { initBackend } from "../src/model/backend.js";
import { loadModelSync } from "../src/io/model.js";
import { loadTokenizer } from "../src/io/tokenizer.js";
import { readPairs, tokenizePairs } from "../src/io/pairs.js";
import { DEFAULT_TUNE, tuneDPO } from "../src/train/dpo.js";
import { runAnalysis } from "../src/analysis/run.js";
import { DEFAULT_SETTINGS } from "../src/analysis/settings.js";

const nTrain = Number(process.argv[2] ?? 64);
const nTest = Number(process.argv[3] ?? 40);
const backend = await initBackend();
const base = loadModelSync("fixtures/models/stories260k");
const tok = loadTokenizer("fixtures/models/stories260k")!;
const train = tokenizePairs(readPairs("fixtures/data/stories/train.jsonl").pairs, tok, 512, { limit: nTrain }).pairs;
const test = tokenizePairs(readPairs("fixtures/data/stories/test.jsonl").pairs, tok, 512, { limit: nTest }).pairs;
const L = base.config.numLayers;
const f = (x: number) => (Number.isFinite(x) ? x.toFixed(3) : "-");
console.log(
  `backend ${backend}; DPO rank 1 on layers.K.mlp.down_proj, ${train.length} train pairs, 2 epochs, lr 0.02, β 0.1; analysis on ${test.length} held-out pairs\n`,
);
console.log(
  `| K | held-out gap | ${Array.from({ length: L }, (_, l) => `recovery L${l}`).join(" | ")} | max abs(gain) before K | max abs(gain − gap) from K | PCA layer | PC1 variance | k = 1 recovery | random k = 1 |`,
);
console.log(`|---|---|${Array.from({ length: L }, () => "---|").join("")}---|---|---|---|---|---|`);
for (let K = 0; K < L; K++) {
  const res = await tuneDPO(base, train, {
    ...DEFAULT_TUNE,
    train: [`layers.${K}.mlp.down_proj`],
    rank: 1,
    epochs: 2,
    lr: 2e-2,
    seed: K,
  });
  const r = await runAnalysis(base, res.model, test, {
    ...DEFAULT_SETTINGS,
    bootstrap: 200,
    stabilityReps: 20,
    batchPairs: 8,
  });
  const rec = r.patching.map((e) => e.recovery);
  const before = Math.max(0, ...r.patching.filter((e) => e.layer < K).flatMap((e) => e.gains.map(Math.abs)));
  const after = Math.max(
    ...r.patching.filter((e) => e.layer >= K).flatMap((e) => e.gains.map((g, i) => Math.abs(g - r.pairs[i]!.gap))),
  );
  const k1 = r.pca!.recovery.find((x) => x.k === 1)!;
  console.log(
    `| ${K} | ${f(r.summary.mean_gap)} | ${rec.map(f).join(" | ")} | ${before.toExponential(1)} | ${after.toExponential(1)} | ${r.pca!.layer} | ${f(r.pca!.explained_variance_ratio[0]!)} | ${f(k1.recovery)} | ${f(k1.random_subspace)} |`,
  );
  tf.dispose(res.ownTensors);
}
